"""postprocess_masks, fill_holes and overlay: native vs reference, semantics, bad input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from rau_rt import InputError, ops
from rau_rt.geometry import box_from_mask
from rau_rt.ops._bilinear import resize_plane

requires_native = pytest.mark.skipif(
    not ops.native_available(), reason="rau_rt._native is not built (NumPy path only)"
)


def blob_logits(rng, regions, size, noise=0.5):
    """Smooth blobs (like SAM2 low-res logits) plus noise; some regions may be empty."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = []
    for _ in range(regions):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.1, 0.4) * max(h, w)
        plane = 4.0 * (1.0 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        planes.append(plane + rng.normal(0, noise, size).astype(np.float32))
    return np.stack(planes).astype(np.float32)


def assert_masksets_match(actual, expected, logits, frame_size, threshold=0.0):
    # Masks may differ only at threshold ties (|upsampled logit - threshold| tiny).
    for n, plane in enumerate(logits):
        values = resize_plane(plane, frame_size)
        decided = np.abs(values - np.float32(threshold)) > 1e-5
        np.testing.assert_array_equal(actual.masks[n][decided], expected.masks[n][decided])
    assert actual.boxes == expected.boxes
    np.testing.assert_array_equal(actual.areas, expected.areas)
    np.testing.assert_allclose(actual.scores, expected.scores, rtol=1e-6, atol=1e-9)


@requires_native
@pytest.mark.parametrize(("low", "frame"), [
    ((1, 1), (1, 1)), ((3, 5), (3, 5)), ((1, 1), (7, 9)), ((3, 5), (37, 21)),
    ((64, 64), (1080, 1920)), ((256, 256), (1411, 1411)), ((17, 23), (5, 4)),
])
def test_postprocess_native_matches_reference(low, frame):
    rng = np.random.default_rng(low[0] * 1000 + frame[1])
    logits = blob_logits(rng, 3, low)
    expected = ops.postprocess_masks_reference(logits, frame)
    actual = ops.postprocess_masks(logits, frame)
    assert actual.masks.shape == (3, *frame) and actual.masks.dtype == np.uint8
    assert_masksets_match(actual, expected, logits, frame)


@requires_native
def test_postprocess_reads_strided_logits_and_sam2_layout():
    rng = np.random.default_rng(7)
    base = blob_logits(rng, 4, (40, 52))
    for view in (base[::2], base[:, ::-1, :], base[:, :, 3:41], base[:, None]):
        expected = ops.postprocess_masks_reference(np.ascontiguousarray(view), (90, 70))
        actual = ops.postprocess_masks(view, (90, 70))
        squeezed = view[:, 0] if view.ndim == 4 else view
        assert_masksets_match(actual, expected, np.ascontiguousarray(squeezed), (90, 70))


def test_postprocess_boxes_areas_scores_are_exact_for_a_known_mask():
    logits = np.full((2, 8, 8), -5.0, dtype=np.float32)
    logits[0, 2:5, 3:7] = 5.0  # rows 2..4, cols 3..6
    result = ops.postprocess_masks(logits, (8, 8))  # same size: no interpolation
    assert result.boxes == [(3, 2, 7, 5), None]
    assert result.areas.tolist() == [12, 0]
    assert result.scores[0] == pytest.approx(1 / (1 + np.exp(-5.0)))
    assert result.scores[1] == 0.0
    assert box_from_mask(result.masks[0]) == result.boxes[0]
    assert result.masks[1].sum() == 0


def test_postprocess_threshold_is_strict_and_handles_no_regions():
    logits = np.zeros((1, 4, 4), dtype=np.float32)
    assert ops.postprocess_masks(logits, (4, 4)).boxes == [None]  # logit == threshold is outside
    assert ops.postprocess_masks(logits, (4, 4), threshold=-0.5).areas.tolist() == [16]
    empty = ops.postprocess_masks(np.zeros((0, 4, 4), np.float32), (9, 9))
    assert empty.masks.shape == (0, 9, 9) and empty.boxes == []


@requires_native
def test_postprocess_into_a_given_buffer_allocates_no_frame():
    logits = blob_logits(np.random.default_rng(3), 3, (256, 256))
    out = np.empty((3, 540, 960), dtype=np.uint8)
    ops.postprocess_masks(logits, (540, 960), out=out)
    tracemalloc.start()
    try:
        result = ops.postprocess_masks(logits, (540, 960), out=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.masks is out
    assert peak < 16 * 1024  # per-region stats only


def ring_logits():
    plane = np.full((12, 12), -3.0, dtype=np.float32)
    plane[2:10, 2:10] = 3.0
    plane[5:7, 5:7] = -3.0  # a 2x2 hole inside the square
    plane[0, 11] = 3.0  # a 1-pixel sprinkle
    return plane[None]


def test_fill_holes_fills_small_holes_and_removes_sprinkles():
    filled = ops.fill_holes(ring_logits(), max_hole_area=4)
    assert (filled[0, 5:7, 5:7] == np.float32(0.1)).all()
    assert filled[0, 0, 11] == 3.0  # sprinkles untouched without max_sprinkle_area
    assert filled[0, 0, 0] == -3.0  # the large background is not a hole
    cleaned = ops.fill_holes(ring_logits(), max_hole_area=3, max_sprinkle_area=1)
    assert (cleaned[0, 5:7, 5:7] == -3.0).all()  # area 4 > 3: kept
    assert cleaned[0, 0, 11] == np.float32(-0.1)


def test_fill_holes_uses_8_connectivity():
    plane = np.full((6, 6), 3.0, dtype=np.float32)
    plane[1, 1] = plane[2, 2] = -3.0  # diagonal neighbours: one hole of area 2
    assert (ops.fill_holes(plane[None], max_hole_area=1)[0] == plane).all()
    assert (ops.fill_holes(plane[None], max_hole_area=2)[0] > 0).all()


@requires_native
@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_native_matches_opencv_reference(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.3, 1.0, size=(3, 31, 45)).astype(np.float32)
    for holes, sprinkles in ((8, 0), (3, 5), (0, 2)):
        np.testing.assert_array_equal(
            ops.fill_holes(logits, holes, sprinkles),
            ops.fill_holes_reference(logits, holes, sprinkles))
    in_place = logits.copy()
    assert ops.fill_holes(in_place, 8, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, ops.fill_holes_reference(logits, 8))


def test_postprocess_with_hole_filling_fills_before_upsampling():
    logits = ring_logits()
    plain = ops.postprocess_masks(logits, (24, 24))
    filled = ops.postprocess_masks(logits, (24, 24), max_hole_area=4, max_sprinkle_area=1)
    assert filled.areas[0] > plain.areas[0]
    assert filled.masks[0, 0, 23] == 0 and plain.masks[0, 0, 23] == 1


@requires_native
def test_overlay_native_matches_reference():
    rng = np.random.default_rng(9)
    frame = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    masks = (rng.random((3, 37, 53)) > 0.6).astype(np.uint8)
    colors = np.array([[255, 0, 0], [0, 255, 0], [10, 20, 30]], dtype=np.uint8)
    expected = ops.overlay_reference(frame, masks, colors, alpha=0.4)
    actual = ops.overlay(frame, masks.astype(bool), colors, alpha=0.4)
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(actual[masks.sum(0) == 0], frame[masks.sum(0) == 0])


def test_overlay_blends_in_place_and_draws_boxes():
    frame = np.zeros((20, 30, 3), dtype=np.uint8)
    masks = np.zeros((1, 20, 30), dtype=np.uint8)
    masks[0, 5:10, 5:10] = 1
    result = ops.overlay(frame, masks, [(200, 100, 0)], alpha=0.5, out=frame)
    assert result is frame
    assert frame[7, 7].tolist() == [100, 50, 0]
    ops.overlay(frame, masks, [(0, 0, 255)], alpha=0.0, boxes=[(2, 2, 15, 12)], labels=["LAD"],
                out=frame)
    assert frame[2, 8].tolist() == [0, 0, 255]  # top edge of the box


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ops.postprocess_masks(np.zeros((2, 4, 4), np.float64), (8, 8)), "float32"),
        (lambda: ops.postprocess_masks(np.zeros((4, 4), np.float32), (8, 8)), r"\(N, h, w\)"),
        (lambda: ops.postprocess_masks(np.zeros((1, 4, 4), np.float32), (0, 8)), "positive"),
        (lambda: ops.postprocess_masks(np.zeros((1, 4, 4), np.float32), (8, 8),
                                       out=np.empty((1, 8, 9), np.uint8)), "out"),
        (lambda: ops.postprocess_masks(np.zeros((1, 4, 4), np.float32), (8, 8),
                                       max_hole_area=-1), "max_hole_area"),
        (lambda: ops.fill_holes(np.zeros((1, 4, 4), np.float32), 2.5), "max_hole_area"),
        (lambda: ops.fill_holes(np.zeros((1, 4, 4), np.float32), 2,
                                out=np.zeros((1, 4, 4), np.float64)), "out"),
        (lambda: ops.overlay(np.zeros((4, 4), np.uint8), np.zeros((1, 4, 4), np.uint8)), "frame"),
        (lambda: ops.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((1, 5, 4), np.uint8)),
         "masks"),
        (lambda: ops.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4), np.uint8),
                             [(1, 2)]), "colors"),
        (lambda: ops.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4), np.uint8),
                             alpha=1.5), "alpha"),
        (lambda: ops.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4), np.uint8),
                             boxes=[]), "boxes"),
    ],
)
def test_bad_input_raises_input_error(call, message):
    with pytest.raises(InputError, match=message):
        call()


@pytest.mark.parametrize(("low", "frame"), [((256, 256), (1080, 1920)), ((37, 53), (101, 64)),
                                            ((1080, 1920), (1024, 1024)), ((3, 5), (1, 1))])
def test_bilinear_matches_torch_interpolate(low, frame):
    # sam2 upsamples its low-res logits with F.interpolate(bilinear, align_corners=False); our
    # kernels must sample at the same positions (they compute them with torch's rounding).
    torch = pytest.importorskip("torch", reason="torch comes with the [export] extra")
    plane = np.random.default_rng(0).normal(size=low).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(plane)[None, None], size=frame, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(resize_plane(plane, frame), expected, rtol=0, atol=2e-6)
    logits = plane[None]
    result = ops.postprocess_masks(logits, frame)
    decided = np.abs(expected) > 1e-5
    np.testing.assert_array_equal(result.masks[0][decided], (expected > 0)[decided])
