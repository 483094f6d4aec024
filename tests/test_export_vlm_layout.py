"""`rau_rt.vlm_layout` without torch: the contract file, patch order, prompt and position rules.

Parity of these ports with transformers is in tests/test_export_vlm.py; these check the rules
on hand-made inputs, and that the errors say what to do.
"""

from __future__ import annotations

import numpy as np
import pytest

from rau_rt.errors import BundleError, InputError
from rau_rt.vlm_layout import (
    FAMILIES,
    IMAGE_PLACEHOLDER,
    VlmLayout,
    cast_feeds,
    chat_prompt,
    declared_dtypes,
    decode_positions,
    expand_image_tokens,
    patchify,
    read_layout,
    rope_positions,
    write_layout,
)

FAM = FAMILIES["qwen2_5_vl"]


def layout(grid: int = 4) -> VlmLayout:
    return VlmLayout(family="qwen2_5_vl", input_size=(grid * 14, grid * 14),
                     grid_thw=(1, grid, grid), patch_dim=1176, tokens_per_image=grid * grid // 4,
                     hidden_size=8, vocab_size=32, num_layers=1, num_kv_heads=1, head_dim=4,
                     mrope_section=(1, 0, 1), image_token_id=7, vision_start_token_id=5,
                     vision_end_token_id=6, eos_token_ids=(2,), pad_token_id=0,
                     has_hidden_state=False, past_names=("past_key_values.0.key",
                                                         "past_key_values.0.value"),
                     present_names=("present.0.key", "present.0.value"))


def test_layout_round_trips_through_vlm_json(tmp_path):
    write_layout(tmp_path, layout())
    assert read_layout(tmp_path) == layout()
    assert layout().empty_past(2)["past_key_values.0.key"].shape == (2, 1, 0, 4)


def test_missing_layout_names_the_export_command(tmp_path):
    with pytest.raises(BundleError, match="rau-rt export vlm"):
        read_layout(tmp_path)


def test_patchify_orders_merge_windows_then_patches():
    # pixel value = patch row * 10 + patch col, constant inside a patch
    rows, cols = np.meshgrid(np.arange(56) // 14, np.arange(56) // 14, indexing="ij")
    pixels = np.broadcast_to((rows * 10 + cols).astype(np.float32), (3, 56, 56))
    patches, grid = patchify(pixels, FAM)
    assert grid == (1, 4, 4) and patches.shape == (16, 3 * 2 * 14 * 14)
    # the first 2x2 merge window, row-major, then the window to its right
    assert patches[:, 0].tolist() == [0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33]
    assert np.all(patches == patches[:, :1])  # every patch constant over channel, time, pixels


def test_patchify_refuses_a_size_off_the_grid():
    with pytest.raises(InputError, match="multiple of 28"):
        patchify(np.zeros((3, 42, 56), np.float32), FAM)


def test_prompt_expansion_and_positions():
    lay = layout()  # 2x2 merged grid: 4 tokens per image
    assert chat_prompt([IMAGE_PLACEHOLDER, "hi"], system=None) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n")
    ids = expand_image_tokens([1, 5, 7, 6, 9], lay)
    assert ids.tolist() == [1, 5, 7, 7, 7, 7, 6, 9]
    positions, delta = rope_positions(ids[None], lay)
    assert positions[:, 0].tolist() == [[0, 1, 2, 2, 2, 2, 4, 5],
                                        [0, 1, 2, 2, 3, 3, 4, 5],
                                        [0, 1, 2, 3, 2, 3, 4, 5]]
    assert delta == 6 - 8
    assert decode_positions(8, delta)[:, 0, 0].tolist() == [6, 6, 6]


def test_positions_refuse_an_unexpanded_image():
    with pytest.raises(InputError, match="expand_image_tokens"):
        rope_positions(np.array([[1, 5, 7, 6]]), layout())


def test_cast_feeds_follows_the_declared_dtypes_and_leaves_ids_alone():
    feeds = {"a": np.ones((2,), np.float32), "ids": np.arange(3), "b": np.ones(1, np.float32)}
    cast = cast_feeds(feeds, {"a": "float16", "ids": "float16"})
    assert cast["a"].dtype == np.float16 and cast["ids"].dtype == feeds["ids"].dtype
    assert cast["b"] is feeds["b"]  # undeclared (or already right): passed through
    assert declared_dtypes(object(), "vlm_decoder") == {}  # a runner without entries


def test_deepstack_layout_round_trips_and_feeds_zeros(tmp_path):
    lay = VlmLayout(**{**layout().to_dict(), "family": "qwen3_vl", "deepstack_layers": 3})
    write_layout(tmp_path, lay)
    assert read_layout(tmp_path) == lay
    zeros = lay.no_deepstack(1, 2)["deepstack_embeds"]
    assert zeros.shape == (3, 1, 2, 8) and not zeros.any()
    assert layout().no_deepstack(1, 2) == {}
    assert lay.empty_past(1, "float16")["past_key_values.0.key"].dtype == np.float16
