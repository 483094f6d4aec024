"""`rau-rt export vlm --family qwen3_vl`: the Qwen3-VL adapter and its deepstack graph contract.

A tiny random-init Qwen3-VL (3 text layers, 3 vision blocks, deepstack from blocks 0 and 1 into
decoder layers 0 and 1) is exported through the CLI at 224 px (a 14x14 grid of 16-px patches,
49 tokens per image). The exporter itself gates preprocessing, prefill logits and 24 greedy
tokens against transformers; these tests check the same from outside, and that the deepstack
path is live: without its rows the logits change, and the runtime's prefix cache (reference
images in one prefill, the target in the next) reproduces the full prompt's logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rau_rt import cli
from rau_rt.bundle import load_bundle, read_manifest
from rau_rt.config import EngineConfig
from rau_rt.errors import InputError
from rau_rt.export import vlm
from rau_rt.export.vlm import model as vlm_model
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.localization import Decoder
from rau_rt.vlm_layout import DECODER, EMBED, FAMILIES, VISION, read_layout, rope_positions

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 24
INPUT = 224


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return vlm_model.build_random(tmp_path_factory.mktemp("qwen3vl") / "model", "tiny",
                                  "qwen3_vl")


@pytest.fixture(scope="module")
def bundle_dir(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen3vl") / "bundle"
    assert cli.main(["export", "vlm", "--model", str(model_dir), "--input-size", str(INPUT),
                     "--out", str(out), "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(model_dir, bundle_dir):
    model, tokenizer, fam = vlm_model.load(model_dir)
    images = vlm_verify.sample_images(read_layout(bundle_dir).input_size)
    hf = vlm_verify.hf_inputs(images, tokenizer, fam)
    logits, tokens = vlm_verify.transformers_greedy(model, hf, NEW_TOKENS)
    return {"model": model, "hf": hf, "logits": logits, "tokens": tokens, "images": images}


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    with load_bundle(bundle_dir, config=EngineConfig(precision="fp32")) as loaded:
        yield loaded


def test_family_constants():
    fam = FAMILIES["qwen3_vl"]
    assert (fam.patch_size, fam.merge_size, fam.factor) == (16, 2, 32)
    assert fam.mean == fam.std == (0.5, 0.5, 0.5)
    assert fam.box_convention == "relative_1000" and fam.default_system is None
    assert fam.deepstack and not FAMILIES["qwen2_5_vl"].deepstack


def test_layout_and_manifest_record_the_deepstack_contract(bundle_dir):
    layout = read_layout(bundle_dir)
    assert layout.family == "qwen3_vl" and layout.deepstack_layers == 2
    assert layout.grid_thw == (1, 14, 14) and layout.tokens_per_image == 49
    assert layout.patch_dim == 3 * 2 * 16 * 16
    manifest = read_manifest(bundle_dir)
    specs = {g: manifest.entries(g)[0] for g in (VISION, EMBED, DECODER)}
    vision_out = {s.name: s.shape for s in specs[VISION].outputs}
    assert vision_out["deepstack_features"] == (2, 49, layout.hidden_size)
    assert [s.name for s in specs[EMBED].outputs] == ["inputs_embeds", "deepstack_embeds"]
    names = [s.name for s in specs[DECODER].inputs]
    assert names[:4] == ["inputs_embeds", "attention_mask", "position_ids", "deepstack_embeds"]
    assert specs[DECODER].dynamic_ranges["deepstack_embeds"]["min"] == [2, 1, 1,
                                                                        layout.hidden_size]
    e2e = specs[DECODER].parity["end_to_end"]
    assert e2e["passed"] and e2e["tokens"] == e2e["reference_tokens"]
    assert len(e2e["tokens"]) == NEW_TOKENS and e2e["prefill_logits_max_abs"] <= 1e-4


def test_preprocessing_and_positions_match_transformers(bundle_dir, reference):
    layout = read_layout(bundle_dir)
    ids, patches = vlm_verify.runtime_inputs(reference["images"], layout,
                                             bundle_dir / "tokenizer.json")
    hf = reference["hf"]
    np.testing.assert_array_equal(ids, hf["input_ids"].numpy())
    # Qwen3-VL's template adds no default system turn: user and assistant headers only
    assert (ids == vlm_model.SPECIAL_TOKENS.index("<|im_start|>")).sum() == 2
    np.testing.assert_allclose(np.concatenate(patches), hf["pixel_values"].numpy(), atol=1e-5,
                               rtol=0)
    expected, delta = reference["model"].model.get_rope_index(
        hf["input_ids"], mm_token_type_ids=hf["mm_token_type_ids"],
        image_grid_thw=hf["image_grid_thw"])
    positions, ours = rope_positions(ids, layout)
    np.testing.assert_array_equal(positions, expected.numpy())
    assert ours == int(delta[0, 0])


def test_greedy_tokens_equal_generate(bundle_dir, bundle, reference):
    layout = read_layout(bundle_dir)
    ids, patches = vlm_verify.runtime_inputs(reference["images"], layout,
                                             bundle_dir / "tokenizer.json")
    tokens, logits = vlm_verify.greedy(bundle, layout, ids, patches, NEW_TOKENS,
                                       min_new_tokens=NEW_TOKENS)
    assert tokens == reference["tokens"] and len(set(tokens)) > 5
    assert np.max(np.abs(logits[0] - reference["logits"])) <= 1e-4


def test_vision_graph_deepstack_matches_transformers(bundle, reference):
    model, hf = reference["model"], reference["hf"]
    with torch.inference_mode():
        out = model.model.get_image_features(hf["pixel_values"], hf["image_grid_thw"])
    first = hf["pixel_values"][:hf["image_grid_thw"][0].prod()].numpy()
    got = bundle.run(VISION, {"pixel_values": first})
    np.testing.assert_allclose(got["image_features"], out.pooler_output[0].numpy(), atol=1e-4)
    expected = np.stack([layer[0].numpy() for layer in out.deepstack_features])
    np.testing.assert_allclose(got["deepstack_features"], expected, atol=1e-4)


def test_deepstack_rows_change_the_logits(bundle_dir, bundle, reference):
    layout = read_layout(bundle_dir)
    ids, patches = vlm_verify.runtime_inputs(reference["images"], layout,
                                             bundle_dir / "tokenizer.json")
    embeds = bundle.run(EMBED, {"input_ids": ids,
                                **Decoder(bundle, layout).image_features(patches).feeds()})
    deep = embeds["deepstack_embeds"]
    image = ids[0] == layout.image_token_id
    assert np.all(deep[:, 0, ~image] == 0) and np.all(np.any(deep[:, 0, image] != 0, axis=-1))
    feeds = {**embeds, "attention_mask": np.ones_like(ids),
             "position_ids": rope_positions(ids, layout)[0], **layout.empty_past(1)}
    with_rows = bundle.run(DECODER, feeds)["logits"][0]
    without = bundle.run(DECODER, {**feeds, "deepstack_embeds": np.zeros_like(deep)})["logits"]
    np.testing.assert_allclose(with_rows, reference["logits"], atol=1e-4)
    assert np.max(np.abs(without[0] - reference["logits"])) > 1e-2


def test_prefix_cache_applies_deepstack_in_the_prefill_holding_the_image(bundle_dir, bundle,
                                                                         reference):
    layout = read_layout(bundle_dir)
    ids, patches = vlm_verify.runtime_inputs(reference["images"], layout,
                                             bundle_dir / "tokenizer.json")
    decoder = Decoder(bundle, layout)
    # split after the first image: its deepstack rows go with the prefix, the second's with
    # the tail
    split = int(np.flatnonzero(ids[0] == layout.vision_start_token_id)[1])
    _, prefix = decoder.prefill(ids[:, :split], decoder.image_features(patches[:1]))
    logits, cache = decoder.prefill(ids[:, split:], decoder.image_features(patches[1:]), prefix)
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-4)
    assert cache.length == ids.shape[1]
    with pytest.raises(InputError, match="image-pad tokens"):
        decoder.prefill(ids[:, split:], decoder.image_features(patches))


def test_input_size_must_fit_32_px_units(model_dir, tmp_path):
    with pytest.raises(InputError, match="multiple of 32"):
        vlm.export_vlm(vlm.VlmExportConfig(out=tmp_path / "b", model=model_dir,
                                           input_size=224 + 16))
