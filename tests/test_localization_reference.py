"""`Reference` and `ReferenceBank` on synthetic angiography runs of the same patient in three
C-arm views: the bank picks the view a frame was taken in, switches after `patience` frames
when the view changes, and does not flip when frames alternate between views."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rau_rt.errors import InputError
from rau_rt.reference import BankConfig, Reference, ReferenceBank, pool_features
from rau_rt.synthetic import View, generate_sequence
from rau_rt.types import Region

VIEWS = (View(-30, 25), View(40, 25), View(0, -30))
REFERENCE_FRAME = 20  # contrast plateau
QUERY_FRAMES = [k for k in range(8, 30) if k != REFERENCE_FRAME]


def descriptor(image: np.ndarray) -> np.ndarray:
    """A stand-in for pooled SAM2 features: the image pooled to 16x16, mean removed."""
    pooled = cv2.resize(image.astype(np.float32), (16, 16), interpolation=cv2.INTER_AREA)
    return (pooled - pooled.mean()).ravel()


@pytest.fixture(scope="module")
def runs():
    return [generate_sequence(seed=3, frames=30, size=128, view=v, contrast_delay_frames=2)
            for v in VIEWS]


def make_bank(runs, config: BankConfig | None = None) -> ReferenceBank:
    references = [Reference((run.frames[REFERENCE_FRAME] >> 4).astype(np.uint8),
                            (Region("lad", box=(10, 10, 50, 60)),), name=view.name)
                  for run, view in zip(runs, VIEWS, strict=True)]
    return ReferenceBank(references, [descriptor(run.frames[REFERENCE_FRAME]) for run in runs],
                         config or BankConfig())


def test_bank_picks_the_view_of_the_frame(runs):
    for expected, run in enumerate(runs):
        bank = make_bank(runs)
        for k in QUERY_FRAMES:
            selection = bank.select(descriptor(run.frames[k]))
            assert selection.index == expected, (VIEWS[expected].name, k)
            assert int(np.argmax(selection.similarities)) == expected
        assert bank.current.name == VIEWS[expected].name


def test_bank_switches_after_patience_frames(runs):
    bank = make_bank(runs, BankConfig(margin=0.02, patience=3))
    assert bank.current is None
    first = bank.select(descriptor(runs[0].frames[10]))
    assert first.index == 0 and first.switched
    picks = [bank.select(descriptor(runs[1].frames[k])) for k in range(11, 16)]
    assert [p.index for p in picks] == [0, 0, 1, 1, 1]
    assert [p.switched for p in picks] == [False, False, True, False, False]


def test_bank_does_not_flip_on_alternating_views(runs):
    bank = make_bank(runs, BankConfig(patience=2))
    chosen = [bank.select(descriptor(runs[k % 2].frames[8 + k])).index for k in range(20)]
    assert chosen == [0] * 20
    # without hysteresis the same frames flip every time
    plain = make_bank(runs, BankConfig(margin=0.0, patience=1))
    flips = [plain.select(descriptor(runs[k % 2].frames[8 + k])).index for k in range(20)]
    assert flips == [k % 2 for k in range(20)]


def test_pool_features_and_input_checks(runs):
    features = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    np.testing.assert_allclose(pool_features(features), [5.5, 17.5])
    with pytest.raises(InputError, match=r"\[1, D, h, w\]"):
        pool_features(np.zeros((2, 3)))
    bank = make_bank(runs)
    with pytest.raises(InputError, match="length 3"):
        bank.select(np.ones(3))
    with pytest.raises(InputError, match="norm 0"):
        bank.select(np.zeros(256))
    with pytest.raises(InputError, match="one descriptor per reference"):
        ReferenceBank(bank.references, [np.ones(4)])


def test_reference_checks_and_boxes():
    image = np.zeros((40, 50), np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[5:9, 7:20] = True
    ref = Reference(image, (Region("a", mask=mask), Region("b", polygon=((1, 2), (10, 30)))))
    assert ref.box(ref.regions[0]) == (7, 5, 20, 9) and ref.box(ref.regions[1]) == (1, 2, 11, 31)
    assert ref.rgb().shape == (40, 50, 3) and ref.size == (40, 50)
    with pytest.raises(InputError, match="unique"):
        Reference(image, (Region("a", box=(0, 0, 1, 1)), Region("a", box=(0, 0, 2, 2))))
    with pytest.raises(InputError, match="uint8"):
        Reference(image.astype(np.uint16), (Region("a", box=(0, 0, 1, 1)),))
