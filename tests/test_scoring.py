"""Task accuracy against synthetic truth: Dice, boundary F, presence and their buckets
(rau_rt.synthetic.scoring), and the TruthSink that `rau-rt demo` scores with."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rau_rt.errors import InputError
from rau_rt.io.truth import TruthSink
from rau_rt.synthetic import generate_sequence
from rau_rt.synthetic.scoring import Scorecard, boundary_f, dice
from rau_rt.types import Frame, FrameResult, RegionResult


def _square(size: int, x0: int, y0: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y0:y0 + side, x0:x0 + side] = True
    return mask


def test_dice_and_boundary_f_by_hand():
    a, b = _square(64, 10, 10, 20), _square(64, 20, 10, 20)  # half overlap
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, np.zeros_like(a)) == 0.0 and dice(a, a) == 1.0
    assert boundary_f(a, a) == 1.0
    assert boundary_f(a, _square(64, 11, 10, 20)) == 1.0  # 1 px off: within 2 px
    far = boundary_f(a, _square(64, 40, 40, 20))
    assert far == 0.0
    shifted = boundary_f(a, _square(64, 14, 10, 20))  # 4 px: only the top/bottom rows match
    assert 0.2 < shifted < 0.8


@pytest.fixture(scope="module")
def cine():
    return generate_sequence(seed=3, frames=30, size=128, segments=("5", "6", "8"))


def test_perfect_and_empty_predictions_score_as_defined(cine):
    perfect, empty = Scorecard(), Scorecard()
    for truth in cine.truth:
        for name, segment in truth.segments.items():
            diameter = cine.meta.diameters_mm[name]
            perfect.add(name, segment.mask(128) if segment.present else None, segment, truth,
                        (128, 128), diameter)
            empty.add(name, None, segment, truth, (128, 128), diameter)
    good, bad = perfect.summary(), empty.summary()
    assert good["dice_mean"] == good["boundary_f"] == good["presence_acc"] == 1.0
    assert good["frames"] == 90 and good["segments"] == 3
    present = sum(s.present for t in cine.truth for s in t.segments.values())
    assert bad["dice_mean"] == 0.0
    assert bad["presence_acc"] == pytest.approx(1 - present / 90)
    # the contrast washes in during these 30 frames: every segment changes presence
    assert good["presence_acc_changing"] == 1.0
    # left main (5) is >= 3 mm, LAD apical (8) < 2 mm or 2-3 mm: both buckets filled
    assert good["dice_by_calibre"][">=3mm"] == 1.0
    assert sum(v is not None for v in good["dice_by_calibre"].values()) >= 2
    assert sum(v is not None for v in good["dice_by_phase"].values()) >= 2


def test_truth_sink_scores_a_run_and_draws_truth_beside_prediction(cine, tmp_path):
    sink = TruthSink(tmp_path / "side.png", cine, ("5", "6"))
    for truth, image in zip(cine.truth, cine.frames, strict=True):
        regions = {}
        for name in ("5", "6"):
            seg = truth.segments[name]
            mask = seg.mask(128) if seg.present else None
            regions[name] = RegionResult(present=mask is not None, mask=mask,
                                         box=seg.box if mask is not None else None,
                                         score=1.0 if mask is not None else 0.0, source="track")
        frame = Frame(truth.index, truth.time_s, image, "gray", 12, window=cine.meta.window)
        sink.write(frame, FrameResult(truth.index, truth.time_s, (128, 128), regions, {}, 1.0))
    sink.close()
    assert sink.summary()["dice_mean"] == 1.0
    picture = cv2.imread(str(tmp_path / "side.png"))
    assert picture.shape == (128, 262, 3)
    # both halves carry the same coloured masks on the fullest frame
    left, right = picture[:, :128].astype(int), picture[:, 134:].astype(int)
    assert np.abs(left - right)[30:].mean() < 2.0


def test_truth_sink_refuses_regions_the_cine_does_not_have(cine, tmp_path):
    with pytest.raises(InputError, match="not in the synthetic cine"):
        TruthSink(tmp_path / "x.png", cine, ("5", "1"))
