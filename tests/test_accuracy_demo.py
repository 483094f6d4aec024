"""The shipped demo SAM2 finds the right anatomy: exported through the user's path (`rau-rt
demo`'s bundle, the session's `demo` fixture), run by the Tracker on a held-out cine, scored
against exact truth (issue 15: an accuracy regression test, not a timing test). The shipped
weights are below the goals (Dice 0.85 from a mask, 0.75 from boxes): the floors here are what
they reach on this cine (seed 101, 40 frames: mask 0.65, box 0.60, reference 0.53 on segments
>= 2 mm) less 0.05, so a regression fails; raise them with better weights. Random weights
score about 0.005."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("sam2")

from benchmarks.bench_accuracy import HELD_OUT, Sam2Weights, prepare, score, tracker_run
from rau_rt.bundle import load_bundle
from rau_rt.commands.demo import SHIPPED_SAM2, SHIPPED_SAM2_CONFIG
from rau_rt.config import EngineConfig
from rau_rt.synthetic.scoring import Scorecard

FLOORS = {"mask": 0.60, "box": 0.55, "reference": 0.47}


@pytest.fixture(scope="module")
def bundle(demo):
    with load_bundle(demo["bundle"] / "sam2", config=EngineConfig(spin_wait=False)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def cine(tmp_path_factory):
    return prepare(HELD_OUT[0], 40, tmp_path_factory.mktemp("cine"))


@pytest.mark.parametrize("regime", sorted(FLOORS))
def test_shipped_weights_segment_the_requested_segments(bundle, cine, regime):
    masks, _, _ = tracker_run(bundle, cine, regime)
    card = Scorecard()
    score(cine, masks, card)
    result = card.summary()
    assert result["dice_ge2mm"] >= FLOORS[regime], result
    assert result["presence_acc"] >= 0.8, result


def test_the_weights_name_the_config_they_fit(tmp_path):
    import torch

    from rau_rt.errors import InputError
    from rau_rt.export.sam2.model import stored_config

    # the demo and the benchmarks build the architecture the shipped file says it was trained as
    assert stored_config(SHIPPED_SAM2) == SHIPPED_SAM2_CONFIG
    assert Sam2Weights.of(SHIPPED_SAM2).label == f"{SHIPPED_SAM2_CONFIG}@256"
    meta_pt = tmp_path / "sam2.pt"  # sam2's own format carries no config: it must be named
    torch.save({"model": {}}, meta_pt)
    with pytest.raises(InputError, match="--config"):
        Sam2Weights.of(meta_pt)
    assert Sam2Weights.of(meta_pt, "mini").source().name == "mini"


def test_single_frames_decode_the_boxed_segments(tmp_path):
    from benchmarks.bench_accuracy import frames_suite

    cases, facts = frames_suite(Sam2Weights.of(SHIPPED_SAM2), HELD_OUT[:1], 24, tmp_path)
    dice = {c["case"].rsplit("/", 1)[1]: c["task"]["dice_ge2mm"] for c in cases}
    assert [c["case"] for c in cases] == [f"frames/{SHIPPED_SAM2_CONFIG}@256/fp32/exact-box",
                                         f"frames/{SHIPPED_SAM2_CONFIG}@256/fp32/jittered-box"]
    # the shipped weights decode 0.75 / 0.74 on these frames (floors 0.05 below, as above)
    assert dice["exact-box"] >= 0.70 and dice["jittered-box"] >= 0.69
    assert facts["cines"][0]["seed"] == HELD_OUT[0].seed
