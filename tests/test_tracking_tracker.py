"""The Tracker against sam2's own SAM2VideoPredictor, frame by frame, on the same weights.

The micro model (random weights with the presence-head bias, so regions are present) runs at
256 px on synthetic angiography frames written as JPEG (the
predictor reads JPEG folders); the Tracker gets the same decoded pixels. Frames are 256 x 256,
so neither side resizes. Hole filling is off on both sides: sam2 fills holes only with its CUDA
extension `sam2._C`, which a CPU install lacks (it skips the step), so the reference has none.

Random weights are too flat to test much: mask logits stay under 0.5, and an object pointer
moves the next frame's logits by 1e-5, so a tracker with the wrong pointer token would pass a
1e-4 comparison. The checkpoint here has the mask hypernetworks' and pointer projection's last
layers scaled by 10 (logits up to 3.3, masks covering about 24 % of the frame, a wrong pointer
costs 1e-3): weights a trained model could have, the same for both sides.

Parity runs the exported ONNX bundle (the user's path) for the box-prompt cases, and the eager
graphs (`EagerGraphs`, same modules) where a forward hook on the model forces the object score
negative on chosen frames, which only an eager model can take.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from rau_rt.bundle import load_bundle, read_manifest
from rau_rt.config import EngineConfig
from rau_rt.errors import BundleError, InputError
from rau_rt.export import sam2
from rau_rt.export.sam2.graphs import EagerGraphs, graph_specs
from rau_rt.export.sam2.inputs import CheckFrames
from rau_rt.export.sam2.model import ModelSource, load_model, random_model
from rau_rt.sam2_layout import LAYOUT_FILE, read_layout
from rau_rt.synthetic import generate_sequence, make_reference
from rau_rt.tracking import STAGES, Tracker, TrackerConfig
from rau_rt.types import Frame

SIZE = 256
FRAMES = 20
SHARPEN = 10.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro checkpoint in Meta's format with the sharpened weights (module docstring)."""
    model = random_model("micro", SIZE, seed=0)
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= SHARPEN
        model.obj_ptr_proj.layers[-1].weight *= SHARPEN
    path = tmp_path_factory.mktemp("tracker_checkpoint") / "micro.pt"
    torch.save({"model": model.state_dict()}, path)
    return ModelSource(image_size=SIZE, checkpoint=path, config="micro")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """20 contrast-filled frames as JPEG files and as the RGB arrays PIL decodes, + boxes."""
    root = tmp_path_factory.mktemp("clip")
    sequence = generate_sequence(seed=3, frames=FRAMES + 10, size=SIZE, contrast_delay_frames=1)
    for i, frame in enumerate(sequence.frames_8bit()[10:]):
        Image.fromarray(frame).convert("RGB").save(root / f"{i:05d}.jpg", quality=95)
    images = [np.array(Image.open(root / f"{i:05d}.jpg").convert("RGB")) for i in range(FRAMES)]
    truth = sequence.truth[10].segments.values()
    boxes = sorted((s.box for s in truth if s.present and s.box),
                   key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    return root, images, [np.asarray(b, np.float32) for b in boxes[:3]]


@pytest.fixture(scope="module")
def model(checkpoint):
    built = load_model(checkpoint)
    built.fill_hole_area = 0  # see the module docstring
    return built


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("tracker_bundle") / "bundle"
    with contextlib.redirect_stderr(io.StringIO()):
        sam2.export_sam2(sam2.Sam2ExportConfig(checkpoint, out),
                         CheckFrames.synthetic(generate_sequence, regions=2))
    return out


def run_predictor(model, video: Path, boxes, *, reference=None, frames=FRAMES):
    """sam2's predictor: boxes on the first stream frame, propagate. -> (masks, scores, low-res
    logits) per frame: (regions, H, W) bool, (regions,) float, (regions, S/4, S/4) float32.
    With `reference` (masks; the folder holds the reference image as frame 0), the reference
    masks are added on frame 0 and the boxes on frame 1."""
    with torch.inference_mode(), warnings.catch_warnings(), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        state = model.init_state(str(video))
        first = 0
        if reference is not None:
            for k, mask in enumerate(reference):
                model.add_new_mask(state, frame_idx=0, obj_id=k, mask=mask)
            first = 1
        for k, box in enumerate(boxes):
            model.add_new_points_or_box(state, frame_idx=first, obj_id=k, box=box)
        masks = {t: (m[:, 0] > 0).numpy() for t, _, m in model.propagate_in_video(state)}
    scores, logits = {}, {}
    for t in masks:
        stored = []
        for k in range(len(boxes)):
            out = state["output_dict_per_obj"][k]
            stored.append(out["cond_frame_outputs"].get(t) or out["non_cond_frame_outputs"][t])
        scores[t] = np.array([float(o["object_score_logits"]) for o in stored])
        logits[t] = np.stack([o["pred_masks"][0, 0].float().numpy() for o in stored])
    kept = range(first, first + frames)
    return [masks[t] for t in kept], [scores[t] for t in kept], [logits[t] for t in kept]


def run_tracker(tracker, images, boxes, names=None):
    names = names or [f"r{k}" for k in range(len(boxes))]
    tracker.prompt(0, dict(zip(names, boxes, strict=True)))
    return [tracker.step(image) for image in images]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def assert_parity(steps, expected_masks, expected_scores, expected_logits, present=None,
                  max_area=0.6):
    """Per frame and region: presence, object score, low-res logits, mask IoU >= 0.99.

    Random weights make every region's mask look alike (the IoU of two token choices can exceed
    0.99), so the low-res logits are compared too: a wrong token or pointer moves them by 1e-2
    or more, float rounding (ONNX Runtime vs eager, batched vs one by one) by about 1e-6."""
    for t, (step, masks, scores, logits) in enumerate(zip(
            steps, expected_masks, expected_scores, expected_logits, strict=True)):
        for k, name in enumerate(step.regions):
            result = step.regions[name]
            expected = masks[k]
            visible = present is None or present[t]
            assert result.present == visible, (t, name)
            assert np.sign(step.object_scores[name]) == np.sign(scores[k]), (t, name)
            assert abs(step.object_scores[name] - scores[k]) <= 1e-4, (t, name)
            np.testing.assert_allclose(step.low_res_logits[name], logits[k], atol=1e-4,
                                       err_msg=f"frame {t} {name}")
            if not visible:
                assert result.mask is None and result.box is None and not expected.any()
                continue
            # non-trivial masks: two empty (or full) masks would agree for free
            assert 0.01 <= expected.mean() <= max_area, (t, name, expected.mean())
            assert iou(result.mask, expected) >= 0.99, (t, name)
            if expected.mean() > 0.5:  # a large mask's IoU is nearly free: the rest agrees too
                assert iou(~result.mask, ~expected) >= 0.99, (t, name)


@pytest.mark.parametrize("regions", [1, 3])
def test_bundle_tracker_matches_sam2_video_predictor(bundle, model, clip, regions):
    video, images, boxes = clip
    expected = run_predictor(model, video, boxes[:regions])
    with load_bundle(bundle) as graphs:
        tracker = Tracker(graphs, TrackerConfig(fill_hole_area=0, clip_frames=FRAMES))
        steps = run_tracker(tracker, images, boxes[:regions])
    assert_parity(steps, *expected)
    assert steps[0].regions["r0"].source == "user"
    assert {r.source for s in steps[1:] for r in s.regions.values()} == {"track"}
    for step in steps:
        assert set(step.stage_ms) == set(STAGES)
        assert step.stage_ms["image_encoder"] > 0 and step.stage_ms["mask_decoder"] > 0
    assert steps[0].stage_ms["memory_attention"] == 0  # a prompted frame has no memory
    assert all(s.stage_ms["memory_attention"] > 0 for s in steps[1:])


def test_keyframe_re_prompts_match_sam2_when_every_conditioning_frame_fits(bundle, model,
                                                                            clip):
    """The VLM's schedule: boxes again every 5 frames, each added before propagation reaches
    its frame (so sam2 decodes it without memory, as a new conditioning frame). sam2 attends
    every conditioning frame; a tracker with room for all four matches it frame for frame. The
    default bound (2: the first and the newest) departs from sam2 from the third keyframe on."""
    video, images, boxes = clip
    keyframes = (0, 5, 10, 15)
    shifted = {k: [b + np.float32(k / 5) for b in boxes[:2]] for k in keyframes}
    masks = {}
    with torch.inference_mode(), warnings.catch_warnings(), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        state = model.init_state(str(video))
        for start, end in zip(keyframes, (*keyframes[1:], FRAMES), strict=True):
            for k, box in enumerate(shifted[start]):
                model.add_new_points_or_box(state, frame_idx=start, obj_id=k, box=box)
            for t, _, m in model.propagate_in_video(state, start_frame_idx=start,
                                                    max_frame_num_to_track=end - 1 - start):
                masks[t] = (m[:, 0] > 0).numpy()
    scores, logits = [], []
    for t in range(FRAMES):
        stored = [out["cond_frame_outputs"].get(t) or out["non_cond_frame_outputs"][t]
                  for out in (state["output_dict_per_obj"][k] for k in range(2))]
        scores.append(np.array([float(o["object_score_logits"]) for o in stored]))
        logits.append(np.stack([o["pred_masks"][0, 0].float().numpy() for o in stored]))

    def track(max_conditioning: int) -> list:
        with load_bundle(bundle) as graphs:
            tracker = Tracker(graphs, TrackerConfig(fill_hole_area=0, clip_frames=FRAMES,
                                                    max_conditioning=max_conditioning))
            steps = []
            for t, image in enumerate(images):
                if t in shifted:
                    tracker.prompt(t, {f"r{k}": b for k, b in enumerate(shifted[t])})
                steps.append(tracker.step(image))
        return steps

    assert_parity(track(len(keyframes)), [masks[t] for t in range(FRAMES)], scores, logits)
    bounded = track(2)
    drift = [max(np.abs(s.low_res_logits[f"r{k}"] - logits[t][k]).max() for k in range(2))
             for t, s in enumerate(bounded)]
    assert max(drift[:11]) <= 1e-4  # two keyframes fit: the same memory
    assert max(drift[11:]) > 1e-3  # frame 10's keyframe evicted frame 0's


def test_region_disappears_and_comes_back_like_sam2(model, clip):
    """Object score forced negative on frames 7-10 (both sides share the model and its hook)."""
    video, images, boxes = clip
    absent = set(range(7, 11))
    calls = {"frame": 0}

    def hook(module, args, output):
        return output - 50.0 if calls["frame"] in absent else output

    head = model.sam_mask_decoder.pred_obj_score_head
    handle = head.register_forward_hook(hook)
    try:
        # the predictor calls the decoder once per frame, in order, for one object
        original = model.sam_mask_decoder.forward

        def counting(*args, **kwargs):
            result = original(*args, **kwargs)
            calls["frame"] += 1
            return result

        model.sam_mask_decoder.forward = counting
        expected = run_predictor(model, video, boxes[:1])
        del model.sam_mask_decoder.forward
        tracker = Tracker(EagerGraphs(model), TrackerConfig(fill_hole_area=0,
                                                            clip_frames=FRAMES))
        tracker.prompt(0, {"r0": boxes[0]})
        steps = []
        for t, image in enumerate(images):
            calls["frame"] = t
            steps.append(tracker.step(image))
    finally:
        handle.remove()
    present = [t not in absent for t in range(FRAMES)]
    assert_parity(steps, *expected, present=present)
    assert [s.regions["r0"].present for s in steps] == present


def _polygon_mask(polygon, size):
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(np.asarray(polygon)).astype(np.int32)], 1)
    return mask.astype(bool)


def test_reference_setup_matches_sam2_mask_then_box(model, clip, tmp_path):
    """RAU's setup: the annotated reference (another patient and view) as sam2's add_new_mask
    on frame 0 of the clip, the box on the first stream frame; then tracking."""
    _, images, boxes = clip
    reference = make_reference(seed=5, size=SIZE)
    ref_rgb = np.array(Image.fromarray(reference.image_8bit()).convert("RGB"))
    Image.fromarray(ref_rgb).save(tmp_path / "00000.jpg", quality=95)
    ref_rgb = np.array(Image.open(tmp_path / "00000.jpg").convert("RGB"))
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i + 1:05d}.jpg", quality=100)
    stream = [np.array(Image.open(tmp_path / f"{i + 1:05d}.jpg").convert("RGB"))
              for i in range(FRAMES)]
    masks = [_polygon_mask(r.polygon, SIZE) for r in reference.regions[:2]]
    expected_masks, expected_scores, expected_logits = run_predictor(model, tmp_path, boxes[:2],
                                                                     reference=masks)
    tracker = Tracker(EagerGraphs(model), TrackerConfig(fill_hole_area=0,
                                                        clip_frames=FRAMES + 1))
    tracker.add_reference(ref_rgb, {"r0": masks[0], "r1": masks[1]})
    steps = run_tracker(tracker, stream, boxes[:2])
    # two conditioning frames: sam2 attends to 2 + 6 memories and 2 + 15 pointers, as here
    assert_parity(steps, expected_masks, expected_scores, expected_logits)


def test_regions_join_and_leave_mid_stream(bundle, clip):
    """B joins at frame 5, A leaves at frame 12; each matches a tracker that only had it."""
    _, images, boxes = clip
    config = TrackerConfig(fill_hole_area=0)
    with load_bundle(bundle) as graphs:
        alone_a = run_tracker(Tracker(graphs, config), images[:12], boxes[:1], ["A"])
        alone_b = run_tracker(Tracker(graphs, config), images[5:], boxes[1:2], ["B"])
        tracker = Tracker(graphs, config)
        tracker.prompt(0, {"A": boxes[0]})
        steps = []
        for t, image in enumerate(images):
            if t == 5:
                tracker.prompt(5, {"B": boxes[1]}, source="vlm")
            if t == 12:
                tracker.remove_region("A")
            steps.append(tracker.step(image))
    assert [list(s.regions) for s in steps] == [["A"]] * 5 + [["A", "B"]] * 7 + [["B"]] * 8
    assert steps[5].regions["B"].source == "vlm" and steps[5].regions["A"].source == "track"
    for t in range(12):
        np.testing.assert_allclose(steps[t].low_res_logits["A"], alone_a[t].low_res_logits["A"],
                                   atol=1e-4)
    for t in range(5, FRAMES):
        np.testing.assert_allclose(steps[t].low_res_logits["B"],
                                   alone_b[t - 5].low_res_logits["B"], atol=1e-4)
    assert tracker.regions == ["B"]
    with pytest.raises(InputError, match="not tracked"):
        tracker.remove_region("A")


def test_bad_frames_raise_and_leave_the_state_unchanged(bundle, clip):
    _, images, boxes = clip
    with load_bundle(bundle) as graphs:
        clean = run_tracker(Tracker(graphs), images[:4], boxes[:1])
        tracker = Tracker(graphs)
        tracker.prompt(0, {"r0": boxes[0]})
        got = [tracker.step(images[0]), tracker.step(images[1])]
        nan = np.zeros((3, SIZE, SIZE), np.float32)
        nan[0, 5, 5] = np.nan
        bad = [images[2].astype(np.float64), images[2][..., :2], images[2][None],
               np.zeros((3, SIZE, SIZE), np.float32) + np.inf, [1, 2, 3]]
        for frame in bad:
            with pytest.raises(InputError):
                tracker.step(frame)
        with pytest.raises(InputError, match="NaN"):
            tracker.step(nan, frame_size=(SIZE, SIZE))
        assert tracker.frame_index == 2
        got += [tracker.step(images[2]), tracker.step(images[3])]
    for a, b in zip(got, clean, strict=True):
        assert a.index == b.index
        np.testing.assert_array_equal(a.low_res_logits["r0"], b.low_res_logits["r0"])


def test_prompts_and_references_are_checked(bundle, clip):
    _, images, boxes = clip
    with load_bundle(bundle) as graphs:
        tracker = Tracker(graphs)
        for box in ([1, 2, 3], [10, 10, 5, 20], [0, 0, np.nan, 4]):
            with pytest.raises(InputError, match="box"):
                tracker.prompt(0, {"r": box})
        with pytest.raises(InputError, match="source"):
            tracker.prompt(0, {"r": boxes[0]}, source="oracle")
        tracker.step(images[0])  # no regions yet: counted, nothing tracked
        with pytest.raises(InputError, match="next frame is 1"):
            tracker.prompt(0, {"r": boxes[0]})
        with pytest.raises(InputError, match="outside"):
            tracker.prompt(1, {"r": [300, 300, 310, 320]})
        with pytest.raises(InputError, match="empty"):
            tracker.add_reference(images[0], {"r": np.zeros((SIZE, SIZE), bool)})
        with pytest.raises(InputError, match="expected"):
            tracker.add_reference(images[0], {"r": np.ones((10, 10), bool)})
        with pytest.raises(InputError, match="at most 16"):
            tracker.prompt(1, {f"r{k}": boxes[0] for k in range(17)})
        assert tracker.regions == []


def test_gray_and_12_bit_frames_and_other_sizes(bundle):
    """A Frame from a DICOM-like source: 12-bit gray, 300 x 200; masks come back at that size."""
    sequence = generate_sequence(seed=1, frames=14, size=304, contrast_delay_frames=1)
    frames = [Frame(i, i / 15, cv2.resize(f, (200, 300)), "gray", 12)
              for i, f in enumerate(sequence.frames[10:])]
    with load_bundle(bundle) as graphs:
        tracker = Tracker(graphs, TrackerConfig(window=tuple(sequence.meta.window)))
        tracker.prompt(0, {"LAD": [40, 60, 120, 200]})
        steps = [tracker.step(f) for f in frames]
    for step in steps:
        result = step.regions["LAD"]
        assert step.frame_size == (300, 200)
        assert result.present and result.mask.shape == (300, 200)
        x1, y1, x2, y2 = result.box
        assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 300


def test_a_frames_own_window_equals_the_configured_one(bundle):
    """A DICOM's VOI window on the Frame is applied like TrackerConfig.window (which wins)."""
    sequence = generate_sequence(seed=1, frames=13, size=256, contrast_delay_frames=1)
    window = tuple(sequence.meta.window)
    with load_bundle(bundle) as graphs:
        runs = []
        for config, frame_window in ((TrackerConfig(window=window), None),
                                     (TrackerConfig(), window),
                                     (TrackerConfig(), None),
                                     (TrackerConfig(window=window), (100.0, 50.0))):
            tracker = Tracker(graphs, config)
            tracker.prompt(0, {"LAD": [40, 60, 120, 200]})
            runs.append([tracker.step(Frame(i, i / 15, f, "gray", 12, frame_window))
                         .low_res_logits["LAD"] for i, f in enumerate(sequence.frames[10:])])
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(runs[0], runs[3], strict=True):  # the configured window wins
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(runs[0], runs[2], strict=True)) > 1e-3


def test_memory_is_constant_over_the_stream(bundle, clip):
    _, images, boxes = clip
    with load_bundle(bundle) as graphs:
        tracker = Tracker(graphs)
        tracker.prompt(0, {"r0": boxes[0], "r1": boxes[1]})
        sizes = []
        for t in range(40):
            tracker.step(images[t % FRAMES])
            sizes.append(tracker.memory_nbytes)
    assert len(set(sizes)) == 1 and sizes[0] > 0


def test_hole_filling_follows_the_bundle(bundle, clip):
    """sam2.json's fill_hole_area (8, the predictor's) fills small background specks."""
    _, images, boxes = clip
    with load_bundle(bundle) as graphs:
        assert read_layout(bundle).fill_hole_area == 8
        filled = run_tracker(Tracker(graphs), images[:3], boxes[:1])
        raw = run_tracker(Tracker(graphs, TrackerConfig(fill_hole_area=0)), images[:3],
                          boxes[:1])
    from rau_rt import ops

    first = ops.fill_holes(raw[0].low_res_logits["r0"][None], 8)[0]
    np.testing.assert_array_equal(filled[0].low_res_logits["r0"], first)


def test_layout_and_specs_describe_the_bundle(bundle, model, tmp_path):
    """graph_specs equals what the export recorded; mask_downsample equals sam2's conv."""
    manifest = read_manifest(bundle)
    specs = graph_specs(model)
    for entry in manifest.graphs:
        assert (entry.inputs, entry.outputs) == specs[entry.graph], entry.graph
    layout = read_layout(bundle)
    masks = (np.random.default_rng(0).random((2, SIZE, SIZE)) > 0.5).astype(np.float32)
    with torch.no_grad():
        expected = model.mask_downsample(torch.from_numpy(masks)[:, None]).numpy()
    np.testing.assert_allclose(layout.mask_downsample(masks), expected, atol=1e-5)
    (tmp_path / LAYOUT_FILE).write_text("{")
    with pytest.raises(BundleError, match="not JSON"):
        read_layout(tmp_path)
    (tmp_path / LAYOUT_FILE).write_text('{"version": 1}')
    with pytest.raises(BundleError, match="layout version 1, this rau-rt reads 2"):
        read_layout(tmp_path)
    with pytest.raises(BundleError, match="re-export"):
        read_layout(tmp_path / "missing")


@pytest.mark.gpu
def test_cuda_fp32_tracker_matches_cpu(model, clip, checkpoint):
    """GPU twin of the parity tests: the torch CUDA backend agrees with the CPU tracker."""
    _, images, boxes = clip
    config = TrackerConfig(fill_hole_area=0)
    cpu = run_tracker(Tracker(EagerGraphs(model), config), images, boxes[:2])
    cuda_model = load_model(checkpoint)
    cuda = run_tracker(Tracker(EagerGraphs(cuda_model, EngineConfig(device="cuda")), config),
                       images, boxes[:2])
    for a, b in zip(cpu, cuda, strict=True):
        assert list(a.regions) == list(b.regions)
        for name in a.regions:
            ours, theirs = a.regions[name], b.regions[name]
            assert ours.present == theirs.present, (a.index, name)
            assert abs(a.object_scores[name] - b.object_scores[name]) <= 1e-3, (a.index, name)
            if not ours.present:  # an absent region has no mask to compare
                assert ours.mask is None and theirs.mask is None
                continue
            area = ours.mask.mean()
            assert 0.001 <= area <= 0.9, (a.index, name, area)  # not trivially equal masks
            assert iou(ours.mask, theirs.mask) >= 0.99, (a.index, name)
            assert iou(~ours.mask, ~theirs.mask) >= 0.99, (a.index, name)


@pytest.mark.gpu
def test_cuda_graphs_track_like_eager_cuda(clip, checkpoint):
    """The tracker over CUDA-graph engines (`EngineConfig.cuda_graph`) gives eager CUDA's
    output; region counts and memory sizes change shapes, so several graphs are captured."""
    _, images, boxes = clip
    config = TrackerConfig(fill_hole_area=0)
    runs = [run_tracker(Tracker(EagerGraphs(load_model(checkpoint),
                                            EngineConfig(device="cuda", cuda_graph=graphed)),
                                config), images, boxes[:2])
            for graphed in (False, True)]
    for a, b in zip(*runs, strict=True):
        for name in a.low_res_logits:
            np.testing.assert_allclose(b.low_res_logits[name], a.low_res_logits[name],
                                       atol=1e-3)


@pytest.mark.slow
def test_tiny_1024_bundle_matches_sam2_video_predictor(tmp_path):
    """hiera-t at 1024 through the ONNX bundle, 8 frames, 1 region."""
    source = ModelSource(image_size=1024, random_init="tiny")
    out = tmp_path / "bundle"
    with contextlib.redirect_stderr(io.StringIO()):
        sam2.export_sam2(sam2.Sam2ExportConfig(source, out),
                         CheckFrames.synthetic(generate_sequence, regions=2))
    sequence = generate_sequence(seed=3, frames=18, size=1024, contrast_delay_frames=1)
    for i, frame in enumerate(sequence.frames_8bit()[10:]):
        Image.fromarray(frame).convert("RGB").save(tmp_path / f"{i:05d}.jpg", quality=95)
    images = [np.array(Image.open(tmp_path / f"{i:05d}.jpg").convert("RGB")) for i in range(8)]
    truth = sequence.truth[10].segments.values()
    box = max((s.box for s in truth if s.present and s.box),
              key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    predictor = load_model(source)
    predictor.fill_hole_area = 0
    expected = run_predictor(predictor, tmp_path, [np.asarray(box, np.float32)], frames=8)
    with load_bundle(out) as graphs:
        tracker = Tracker(graphs, TrackerConfig(fill_hole_area=0, clip_frames=8))
        steps = run_tracker(tracker, images, [np.asarray(box, np.float32)])
    # random tiny weights give a mask of about 75 % of the frame here (not sharpened)
    assert_parity(steps, *expected, max_area=0.9)


def test_profiles_set_the_attended_memories_and_overrides_win():
    from rau_rt.tracking.tracker import PROFILES

    assert TrackerConfig().levers == PROFILES["exact"] == (6, 15, 1, 1, 0)
    assert TrackerConfig().attended == (6, 15)
    assert TrackerConfig(profile="fast").levers == PROFILES["fast"]
    assert TrackerConfig(profile="fast", recent_memories=3).levers == (3, *PROFILES["fast"][1:])
    assert TrackerConfig(memory_interval=4).levers == (6, 15, 4, 1, 0)
    assert TrackerConfig(memory_pool=2).attention_graph == "memory_attention_pooled"
    assert TrackerConfig().attention_graph == "memory_attention"
    with pytest.raises(InputError, match="memory_interval"):
        TrackerConfig(memory_interval=0)
    with pytest.raises(InputError, match="memory_pool"):
        TrackerConfig(memory_pool=4)
    with pytest.raises(InputError, match="profile"):
        TrackerConfig(profile="fastest")
    with pytest.raises(InputError, match="recent_pointers"):
        TrackerConfig(recent_pointers=16)
    with pytest.raises(InputError, match="memory_window"):
        TrackerConfig(memory_window=-1)
    with pytest.raises(InputError, match=r"memory_window.*memory_pool 2"):
        TrackerConfig(memory_window=3, memory_pool=2)
    # fast windows, so pooling with it needs the window turned off by name
    with pytest.raises(InputError, match=r"profile 'fast', set memory_window=0"):
        TrackerConfig(profile="fast", memory_pool=2)
    assert TrackerConfig(profile="fast", memory_pool=2, memory_window=0).levers == (
        2, 15, 2, 2, 0)
    assert TrackerConfig(memory_window=3).graphs == (
        "image_encoder", "mask_decoder", "memory_attention", "memory_attention_window",
        "memory_encoder")


class CountingGraphs:
    """A loaded bundle that records the batch of every memory-encoder call."""

    def __init__(self, graphs):
        self._graphs, self.engines = graphs, graphs.engines
        self.layout = read_layout(graphs.directory)
        self.encoded: list[int] = []

    def run(self, graph, feeds):
        if graph == "memory_encoder":
            self.encoded.append(len(feeds["masks"]))
        return self._graphs.run(graph, feeds)


class Without(CountingGraphs):
    """A loaded bundle without one of its graphs (exported before the graph existed)."""

    def __init__(self, graphs, graph):
        super().__init__(graphs)
        self.engines = {k: v for k, v in graphs.engines.items() if k != graph}


def test_memory_pool_runs_the_pooled_graph_and_tracks(bundle, clip):
    """memory_pool 2 attends through memory_attention_pooled (exported and verified beside the
    exact graph): same frames, same regions, masks close to the exact profile's on this clip;
    a bundle without the graph is refused by name."""
    _, images, boxes = clip
    with load_bundle(bundle) as graphs:
        calls: list[str] = []

        class Recording(CountingGraphs):
            def run(self, graph, feeds):
                calls.append(graph)
                return super().run(graph, feeds)

        pooled = run_tracker(Tracker(Recording(graphs), TrackerConfig(fill_hole_area=0,
                                                                      memory_pool=2)),
                             images[:6], boxes[:2])
        exact = run_tracker(Tracker(graphs, TrackerConfig(fill_hole_area=0)), images[:6],
                            boxes[:2])
        assert "memory_attention_pooled" in calls and "memory_attention" not in calls
        for got, want in zip(pooled[1:], exact[1:], strict=True):
            for name, logits in want.low_res_logits.items():
                assert iou(got.low_res_logits[name] > 0, logits > 0) > 0.8, name

        with pytest.raises(InputError, match="memory_attention_pooled"):
            Tracker(Without(graphs, "memory_attention_pooled"), TrackerConfig(memory_pool=2))
        # the pooled graph stands in for the plain one (what a pipeline opens for memory_pool 2)
        only_pooled = Without(graphs, "memory_attention")
        assert run_tracker(Tracker(only_pooled, TrackerConfig(fill_hole_area=0, memory_pool=2)),
                           images[:3], boxes[:2])[-1].regions
        with pytest.raises(InputError, match=r"four SAM2 graphs.*'memory_attention'"):
            Tracker(only_pooled, TrackerConfig())


def test_tracking_with_another_pooling_than_the_weights_were_trained_with_warns(bundle, caplog,
                                                                                 tmp_path):
    with load_bundle(bundle) as graphs:
        trained_pooled = CountingGraphs(graphs)
        trained_pooled.layout = dataclasses.replace(trained_pooled.layout, memory_pool=2)
        with caplog.at_level("WARNING", logger="rau_rt.tracking.tracker"):
            Tracker(trained_pooled, TrackerConfig(memory_pool=2))
            Tracker(CountingGraphs(graphs), TrackerConfig())
            assert not caplog.records
            Tracker(trained_pooled, TrackerConfig(profile="fast"))
        assert "trained with memory_pool 2" in caplog.text
    data = json.loads((Path(bundle) / LAYOUT_FILE).read_text())
    assert data["memory_pool"] == 1  # random weights: trained (if at all) as sam2
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(data | {"memory_pool": 3}))
    with pytest.raises(BundleError, match="memory_pool 3"):
        read_layout(tmp_path)


def test_memory_interval_skips_the_memory_encoder_between_stored_frames(bundle, clip):
    _, images, boxes = clip
    with load_bundle(bundle) as graphs:
        counting = CountingGraphs(graphs)
        tracker = Tracker(counting, TrackerConfig(fill_hole_area=0, memory_interval=2))
        tracker.prompt(0, {"A": boxes[0]})
        steps = []
        for t, image in enumerate(images[:9]):
            if t == 3:
                tracker.prompt(3, {"B": boxes[1]})
            steps.append(tracker.step(image))
        exact = run_tracker(Tracker(graphs, TrackerConfig(fill_hole_area=0)), images[:2],
                            boxes[:1], ["A"])
    # frame 0: A prompted; 1: skipped; 2: A; 3: B prompted (A skipped: its memory is 1 old);
    # 4: A (B skipped); 5: B; 6: A; 7: B; 8: A
    assert counting.encoded == [1, 1, 1, 1, 1, 1, 1, 1]
    assert steps[1].stage_ms["memory_encoder"] == 0.0
    banks = tracker._banks
    assert banks["A"].feeds(9).frames == (0, 2, 4, 6, 8) and banks["B"].feeds(9).frames == (3, 5, 7)
    # until the first skipped memory would be read, nothing differs from sam2's profile
    for got, want in zip(steps[:2], exact, strict=True):
        np.testing.assert_array_equal(got.low_res_logits["A"], want.low_res_logits["A"])


class SquareMasks(CountingGraphs):
    """A loaded bundle whose mask decoder answers one square (low-res rows and columns
    `square`, logit +5, -5 elsewhere, object score +5) and that records, per frame, the memory
    attention calls (graph, regions) and the decoder's features for tracked frames."""

    def __init__(self, graphs, square: slice):
        super().__init__(graphs)
        self.square = square
        self.calls: list[tuple[str, int]] = []
        self.embeds: list[np.ndarray] = []

    def run(self, graph, feeds):
        out = super().run(graph, feeds)
        if graph.startswith("memory_attention"):
            self.calls.append((graph, len(feeds["memory"])))
        if graph == "mask_decoder":
            masks = np.full_like(out["masks"], -5.0)
            masks[:, :, self.square, self.square] = 5.0
            out = {**out, "masks": masks, "object_score": np.full_like(out["object_score"], 5)}
            if (feeds["point_labels"] == -1).all():
                self.embeds.append(feeds["image_embed"].copy())
        return out


def test_memory_window_conditions_a_window_around_the_last_box(bundle, clip):
    """memory_window 2 on micro@256 (16 x 16 feature grid, 8 x 8 windows): after a full pass,
    two windowed frames, then a full one; a prompt starts over; the features outside the window
    are the previous frame's and the mask is background there; a box that does not fit the
    window with a token to spare always gets full passes."""
    _, images, boxes = clip
    with load_bundle(bundle) as graphs:
        small = SquareMasks(graphs, slice(20, 28))  # grid cells 5-6: window cells 2-9
        tracker = Tracker(small, TrackerConfig(fill_hole_area=0, memory_window=2))
        tracker.prompt(0, {"A": boxes[0]})
        steps = []
        for t, image in enumerate(images[:9]):
            if t == 6:
                tracker.prompt(6, {"A": boxes[0]})
            small.calls.clear()
            steps.append((tracker.step(image), list(small.calls)))
        full, window = ("memory_attention", 1), ("memory_attention_window", 1)
        assert [calls for _, calls in steps] == [
            [], [full], [window], [window], [full], [window], [], [full], [window]]
        # frame 2 (windowed) against frame 1: the same features outside cells 2-9
        inside = np.zeros((16, 16), bool)
        inside[2:10, 2:10] = True
        first, second = small.embeds[0][0], small.embeds[1][0]
        np.testing.assert_array_equal(second[:, ~inside], first[:, ~inside])
        assert not np.allclose(second[:, inside], first[:, inside])
        logits = steps[2][0].low_res_logits["A"]
        assert (logits[20:28, 20:28] == 5.0).all()
        outside = np.ones((64, 64), bool)
        outside[8:40, 8:40] = False
        assert (logits[outside] == -1024.0).all()
        assert (steps[1][0].low_res_logits["A"][outside] == -5.0).all()  # a full pass: as is

        big = SquareMasks(graphs, slice(4, 40))  # 9 cells: no window fits it with one to spare
        tracker = Tracker(big, TrackerConfig(fill_hole_area=0, memory_window=2))
        tracker.prompt(0, {"A": boxes[0]})
        for image in images[:4]:
            tracker.step(image)
        assert big.calls == [("memory_attention", 1)] * 3
        with pytest.raises(InputError, match="memory_attention_window"):
            Tracker(Without(graphs, "memory_attention_window"), TrackerConfig(memory_window=2))
