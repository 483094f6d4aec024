"""geometry.box_from_mask: the one mask-to-box conversion (x2/y2 exclusive)."""

from __future__ import annotations

import numpy as np
import pytest

from rau_rt.errors import InputError
from rau_rt.geometry import box_from_mask, box_iou


def test_box_is_exclusive_at_the_far_edges():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:8] = True  # rows 2-4, columns 3-7
    assert box_from_mask(mask) == (3, 2, 8, 5)


def test_single_pixel_and_full_frame():
    mask = np.zeros((6, 6), np.uint8)
    mask[5, 0] = 1
    assert box_from_mask(mask) == (0, 5, 1, 6)
    assert box_from_mask(np.ones((6, 7), bool)) == (0, 0, 7, 6)


def test_empty_mask_has_no_box():
    assert box_from_mask(np.zeros((4, 4), bool)) is None


def test_offset_places_a_crop_in_the_frame():
    crop = np.zeros((4, 4), bool)
    crop[1, 2] = True
    box = box_from_mask(crop, offset=(100, 50))
    assert box == (102, 51, 103, 52) and all(type(v) is int for v in box)


def test_rejects_non_2d():
    with pytest.raises(InputError, match="2-D"):
        box_from_mask(np.zeros((2, 3, 4), bool))


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching: x2 is exclusive
    assert box_iou((0, 0, 0, 10), (0, 0, 0, 10)) == 0.0  # no area
