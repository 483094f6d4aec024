"""`ops.smart_resize` and `ops.resize_for_vlm` (Qwen2.5-VL input geometry)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rau_rt import InputError, ops


@pytest.mark.parametrize(("size", "expected"), [
    ((512, 512), (504, 504)),  # rounds to the nearest multiple of 28
    ((1080, 1920), (728, 1316)),  # 1092 x 1932 > 1280 tokens: scaled down, floored to 28
    ((20, 30), (56, 84)),  # below min_pixels: scaled up by sqrt(3136 / 600), ceiled to 28
])
def test_smart_resize_known_sizes(size, expected):
    assert ops.smart_resize(*size) == expected


@given(height=st.integers(28, 4000), width=st.integers(28, 4000),
       factor=st.sampled_from([28, 32]))
def test_smart_resize_invariants(height, width, factor):
    if max(height, width) / min(height, width) > 200:
        return
    min_pixels, max_pixels = factor * factor * 4, factor * factor * 1280
    h, w = ops.smart_resize(height, width, factor=factor, min_pixels=min_pixels,
                            max_pixels=max_pixels)
    assert h % factor == 0 and w % factor == 0
    assert min_pixels <= h * w <= max_pixels
    # aspect ratio kept within one factor step per side
    assert abs(h / w - height / width) <= (height / width) * (factor / min(h, w)) * 2 + 1e-9


def test_smart_resize_rejects_bad_geometry():
    with pytest.raises(InputError, match="aspect ratio"):
        ops.smart_resize(10, 3000)
    with pytest.raises(InputError, match="positive"):
        ops.smart_resize(0, 10)
    with pytest.raises(InputError, match="min_pixels"):
        ops.smart_resize(100, 100, min_pixels=10, max_pixels=5)


def test_resize_for_vlm_is_preprocess_at_the_smart_size_with_clip_stats():
    frame = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    vlm = ops.resize_for_vlm(frame)
    assert vlm.size == ops.smart_resize(300, 420) and vlm.source_size == (300, 420)
    expected = ops.preprocess(frame, vlm.size, mean=ops.CLIP_MEAN, std=ops.CLIP_STD)
    np.testing.assert_array_equal(vlm.pixels, expected)


def test_resize_for_vlm_fixed_size_and_buffer():
    frame = np.zeros((512, 512), dtype=np.uint16)
    out = np.empty((3, 448, 448), dtype=np.float32)
    vlm = ops.resize_for_vlm(frame, size=(448, 448), bits_stored=12, out=out)
    assert vlm.pixels is out and vlm.size == (448, 448)
    np.testing.assert_allclose(out[0], -ops.CLIP_MEAN[0] / ops.CLIP_STD[0], rtol=1e-6)
    with pytest.raises(InputError, match="multiples of 28"):
        ops.resize_for_vlm(frame, size=(450, 448))


def test_smart_resize_area_bound_matches_token_budget():
    h, w = ops.smart_resize(4000, 3000)
    assert (h // 28) * (w // 28) <= 1280
    assert math.isclose(h / w, 4000 / 3000, rel_tol=0.05)
