"""Frames keep their aspect on the way into the VLM (issue 18): the aspect buckets are what
Qwen's image processor makes of 1200x900 and 1920x1080 frames at the bundle's pixel budget, and
patches, image tokens and boxes follow the frame's bucket (checked against transformers'
processor); the training pairs' reframed targets keep their truth exact."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from rau_rt import geometry
from rau_rt.errors import InputError
from rau_rt.vlm_layout import ASPECTS, aspect_sizes

BUDGET = 224 * 224
FRAMES = ((900, 1200), (1080, 1920), (1200, 900), (1920, 1080), (512, 512))  # (height, width)


def test_aspect_sizes_are_qwens_smart_resize_of_each_aspect():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    sizes = aspect_sizes(BUDGET, 28)
    assert len(sizes) == len(ASPECTS) and sizes[0] == (224, 224)
    for (h, w), size in zip(ASPECTS, sizes, strict=True):
        assert size[0] % 28 == 0 and size[1] % 28 == 0 and size[0] * size[1] <= BUDGET
        assert (size[0] > size[1]) == (h > w) and (size[0] == size[1]) == (h == w)
    # the processor's own sizes for real frame shapes are buckets
    for frame in FRAMES:
        assert smart_resize(*frame, factor=28, min_pixels=28 * 28, max_pixels=BUDGET) in sizes


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    """(model folder, layout with aspect buckets at 224 x 224 pixels, tokenizer)."""
    pytest.importorskip("transformers", reason="the model builder needs the export extra")
    import transformers

    from rau_rt.export.vlm import model as vlm_model
    from rau_rt.export.vlm.exporter import make_layout

    folder = vlm_model.build_random(tmp_path_factory.mktemp("vlm") / "model", "tiny")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    layout = make_layout(model, "qwen2_5_vl", 224, hidden_state=False)
    layout = replace(layout, buckets=aspect_sizes(BUDGET, layout.family_constants.factor))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return folder, layout, tokenizer


def test_a_frame_goes_to_the_bucket_of_its_aspect(bucketed):
    _, layout, _ = bucketed
    assert layout.size_for((900, 1200)) == (168, 252)
    assert layout.size_for((1080, 1920)) == (168, 280)
    assert layout.size_for((1920, 1080)) == (280, 168)
    assert layout.size_for((1024, 1280)) == (168, 252)  # 5:4 goes to 4:3, the nearest
    assert layout.size_for((512, 512)) == (224, 224)
    without = replace(layout, buckets=())
    assert without.size_for((1080, 1920)) == (224, 224)  # a bundle without buckets stretches
    with pytest.raises(InputError):
        layout.size_for((0, 10))
    # vlm.json keeps the buckets
    from rau_rt.vlm_layout import VlmLayout
    assert VlmLayout.from_dict(layout.to_dict()) == layout


@pytest.mark.parametrize("frame_size", [(900, 1200), (1080, 1920)])
def test_patches_ids_and_boxes_follow_transformers_processor(bucketed, frame_size):
    """A reference and a non-square frame prompted as the localizer prompts them: the same
    grid, patch count and expanded ids as transformers' processor at the same pixel budget, and
    a box survives the round trip through the model's coordinates."""
    from rau_rt.export.vlm import verify as vlm_verify
    from rau_rt.localization import prompts
    from rau_rt.localization.localizer import image_patches
    from rau_rt.reference import Reference
    from rau_rt.types import Region

    folder, layout, tokenizer = bucketed
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:frame_size[0], 0:frame_size[1]]
    frame = np.clip(np.stack([x * 255 / frame_size[1], y * 255 / frame_size[0],
                              np.full(frame_size, 128)], -1)
                    + rng.normal(0, 2, (*frame_size, 3)), 0, 255).astype(np.uint8)
    reference = Reference(frame[::2, ::2].copy(), (Region("LAD", box=(40, 30, 200, 90)),))
    parts = prompts.locate_parts(reference, layout, ["LAD"], layout.family_constants
                                 .default_system)
    images = [reference.image, prompts.annotated_image(reference), frame]
    sizes = [layout.size_for(image.shape[:2]) for image in images]
    hf = vlm_verify.hf_inputs(images, tokenizer, layout.family_constants, parts.parts,
                              max_pixels=BUDGET)
    assert [tuple(g) for g in hf["image_grid_thw"].tolist()] == [layout.grid_for(s)
                                                                  for s in sizes]
    from tokenizers import Tokenizer
    ids = prompts.conversation_ids(Tokenizer.from_file(str(folder / "tokenizer.json")), parts,
                                   layout, sizes)
    np.testing.assert_array_equal(ids, hf["input_ids"].numpy())
    patches = np.concatenate([image_patches(image, layout) for image in images])
    theirs = hf["pixel_values"].numpy()
    assert patches.shape == theirs.shape
    # bilinear (ours) vs bicubic (Qwen's) resampling of a smooth image: close, not equal
    assert float(np.mean(np.abs(patches - theirs))) < 0.05
    # the target's boxes: frame -> model coordinates -> frame, within a model pixel
    convention = layout.family_constants.box_convention
    box = (301.0, 122.0, 777.0, 640.0)
    there = geometry.box_frame_to_vlm(box, convention, sizes[-1], frame_size)
    assert max(there[2], there[0]) <= sizes[-1][1] and max(there[1], there[3]) <= sizes[-1][0]
    back = geometry.box_vlm_to_frame(there, convention, sizes[-1], frame_size)
    cell = max(frame_size[0] / sizes[-1][0], frame_size[1] / sizes[-1][1])
    assert np.max(np.abs(np.subtract(back, box))) <= cell / 2 + 1e-6


def test_reframed_targets_keep_their_truth_exact():
    """Padding shifts every box by the bar; a crop keeps a segment whose lumen mostly stays,
    its box bounding what stays; all shapes of `ASPECTS` occur."""
    from rau_rt.synthetic import SequenceConfig, render_frames
    from rau_rt.synthetic.render import window_8bit
    from rau_rt.train.vlm_data import KEPT_VISIBLE, reframe

    cfg = SequenceConfig(seed=7, frames=40, size=256)
    run = render_frames(cfg, [30])
    view = window_8bit(run.frames[0], run.meta.window)
    segments = run.truth[0].segments
    names = tuple(segments)
    shapes = set()
    for seed in range(60):
        out, truth, _ = reframe(view, segments, names, np.random.default_rng(seed))
        shapes.add(out.shape)
        if out.shape == view.shape:
            assert truth == {n: segments[n].box if segments[n].present and segments[n].box
                             else None for n in names}
            continue
        padded = out.shape[0] > view.shape[0] or out.shape[1] > view.shape[1]
        y0, x0 = (out.shape[0] - 256) // 2, (out.shape[1] - 256) // 2
        for name, box in truth.items():
            if padded:  # the bars are black, the square sits centred, boxes shifted
                assert np.array_equal(out[y0:y0 + 256, x0:x0 + 256], view)
                original = segments[name].box if segments[name].present else None
                assert box == (None if original is None else
                               (original[0] + x0, original[1] + y0, original[2] + x0,
                                original[3] + y0))
            elif box is not None:
                assert 0 <= box[0] < box[2] <= out.shape[1]
                assert 0 <= box[1] < box[3] <= out.shape[0]
                assert segments[name].present
        if not padded:  # find the crop's offset, then check the kept lumen
            full = [(y, x) for y in range(257 - out.shape[0]) for x in range(257 - out.shape[1])
                    if np.array_equal(view[y:y + out.shape[0], x:x + out.shape[1]], out)]
            y, x = full[0]
            for name, box in truth.items():
                mask = segments[name].mask(256)
                kept = mask[y:y + out.shape[0], x:x + out.shape[1]]
                visible = segments[name].present and kept.sum() >= KEPT_VISIBLE * mask.sum() > 0
                assert (box is not None) == visible
                if visible:
                    ys, xs = np.nonzero(kept)
                    assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    expected = {(256, 256)}
    for h, w in ASPECTS[1:]:
        long_side, short_side = 256 * max(h, w) // min(h, w), 256 * min(h, w) // max(h, w)
        expected |= {(long_side, 256) if h > w else (256, long_side),
                     (256, short_side) if h > w else (short_side, 256)}
    assert shapes == expected


@pytest.fixture(scope="module")
def bucket_bundle(tmp_path_factory):
    """A tiny random Qwen2.5-VL exported at 112 px with aspect buckets: (model folder, bundle
    folder)."""
    pytest.importorskip("transformers", reason="the exporter needs the export extra")
    from rau_rt.export import vlm
    from rau_rt.export.vlm import model as vlm_model

    root = tmp_path_factory.mktemp("buckets")
    folder = vlm_model.build_random(root / "model", "tiny")
    vlm.export_vlm(vlm.VlmExportConfig(out=root / "bundle", model=folder, input_size=112,
                                       aspect_buckets=True))
    return folder, root / "bundle"


@pytest.mark.parametrize("frame_size", [(900, 1200), (1080, 1920)])
def test_a_bucketed_bundle_decodes_a_wide_frame_as_transformers_does(bucket_bundle,
                                                                      frame_size):
    """The exported bucket graphs, the per-image token counts and the M-RoPE positions of a
    non-square target: the runtime's greedy tokens are transformers' `generate` on the same
    pixels (ours; resampling differs, see above) with the processor's ids and grids."""
    import torch
    import transformers

    from rau_rt.bundle import load_bundle
    from rau_rt.config import EngineConfig
    from rau_rt.export.vlm import verify as vlm_verify
    from rau_rt.localization import Decoder, Localizer, LocalizerConfig, prompts
    from rau_rt.reference import Reference
    from rau_rt.types import Region
    from rau_rt.vlm_layout import read_layout

    folder, bundle_dir = bucket_bundle
    layout = read_layout(bundle_dir)
    assert layout.sizes == aspect_sizes(112 * 112, 28)
    rng = np.random.default_rng(3)
    reference = Reference(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                          (Region("LAD", box=(40, 30, 200, 90)),))
    frame = rng.integers(0, 256, (*frame_size, 3), dtype=np.uint8)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    with load_bundle(bundle_dir, config=EngineConfig(precision="fp32")) as bundle:
        assert set(layout.vision_graphs) <= set(bundle.engines)
        localizer = Localizer(bundle, reference, LocalizerConfig(constrained=False))
        size = layout.size_for(frame_size)
        parts = prompts.ask_parts(reference, layout, "Where is the LAD?")
        images = [reference.image, prompts.annotated_image(reference), frame]
        hf = vlm_verify.hf_inputs(images, tokenizer, layout.family_constants, parts.parts,
                                  max_pixels=112 * 112)
        ids = localizer.prompt_ids(parts, size)
        np.testing.assert_array_equal(ids, hf["input_ids"].numpy())
        patches = [localizer.patches(image) for image in images]
        sizes = [layout.size_for(image.shape[:2]) for image in images]
        assert [tuple(g) for g in hf["image_grid_thw"].tolist()] == [layout.grid_for(s)
                                                                      for s in sizes]
        hf["pixel_values"] = torch.from_numpy(np.concatenate(patches))
        _, expected = vlm_verify.transformers_greedy(model, hf, 12)
        decoder = Decoder(bundle, layout)
        got = decoder.generate(ids, decoder.image_features(patches, sizes), max_new_tokens=12,
                               min_new_tokens=12, stop_ids=())
        assert list(got.tokens) == expected
        # the localizer's own query on the frame goes through the bucket graph and parses
        result = Localizer(bundle, reference).locate_result(frame, ["LAD"])
        assert result.stop_reason == "grammar" and result.frame_size == frame_size
