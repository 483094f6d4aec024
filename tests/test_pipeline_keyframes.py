"""KeyframePolicy: first frame, schedule, triggers with a minimum gap."""

from __future__ import annotations

import pytest

from rau_rt.errors import InputError
from rau_rt.pipeline import KeyframeConfig, KeyframePolicy

GOOD = {"6": 0.9, "11": 0.8}


def run(policy, frames, scores=GOOD, views=()):
    return {i: r for i in frames
            if (r := policy.decide(i, scores(i) if callable(scores) else scores, i in views))}


def test_first_frame_and_schedule():
    policy = KeyframePolicy(KeyframeConfig(every=10))
    assert run(policy, range(31)) == {0: "first", 10: "scheduled", 20: "scheduled",
                                      30: "scheduled"}
    assert policy.last_keyframe == 30


def test_no_schedule_only_first_frame():
    assert run(KeyframePolicy(KeyframeConfig(every=0)), range(100)) == {0: "first"}


def test_a_lost_region_triggers_once_per_gap():
    """Region 11 is lost from frame 3 on: keyframes at the gap, not on every frame."""
    policy = KeyframePolicy(KeyframeConfig(every=0, min_gap=4))
    got = run(policy, range(14), lambda i: {"6": 0.9, "11": None if i >= 3 else 0.8})
    assert got == {0: "first", 4: "lost:11", 8: "lost:11", 12: "lost:11"}


def test_low_score_and_view_change():
    policy = KeyframePolicy(KeyframeConfig(every=50, min_score=0.5, min_gap=2))
    got = run(policy, range(12), lambda i: {"6": 0.3 if i == 5 else 0.9, "11": 0.8},
              views={9})
    assert got == {0: "first", 5: "low_score:6", 9: "view_change"}


def test_the_schedule_counts_from_the_last_keyframe():
    policy = KeyframePolicy(KeyframeConfig(every=10, min_gap=1))
    got = run(policy, range(20), lambda i: {"6": 0.1 if i == 4 else 0.9})
    assert got == {0: "first", 4: "low_score:6", 14: "scheduled"}


@pytest.mark.parametrize("kwargs", [{"every": -1}, {"min_score": 1.5}, {"min_gap": -2},
                                    {"view_similarity": 1.0}, {"view_similarity": -1.5}])
def test_bad_settings_raise(kwargs):
    with pytest.raises(InputError):
        KeyframeConfig(**kwargs)


def test_frames_must_increase():
    policy = KeyframePolicy()
    policy.decide(5, GOOD)
    with pytest.raises(InputError, match="frames must increase"):
        policy.decide(5, GOOD)
