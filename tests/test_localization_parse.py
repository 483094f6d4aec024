"""The VLM box conventions in rau_rt.geometry, the answer parser and the answer grammar, without
a model: conversions round-trip for both conventions and odd frame sizes, bad answers become
None with a reason, and the grammar's number pattern is exactly 0..limit."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rau_rt import geometry
from rau_rt.errors import InputError
from rau_rt.localization.constrained import box_grammar, max_answer_bytes, number_pattern
from rau_rt.localization.parse import NOT_IN_ANSWER, NOT_VISIBLE, parse_answer
from rau_rt.localization.prompts import answer_json

CONVENTIONS = ("absolute", "relative_1000")
sides = st.integers(1, 4097)


@given(st.sampled_from(CONVENTIONS), sides, sides, st.data())
def test_model_coordinates_round_trip_through_the_frame(convention, height, width, data):
    model = (448, 336)
    extent_w, extent_h = geometry.vlm_extent(convention, model)
    box = tuple(data.draw(st.integers(0, e)) for e in (extent_w, extent_h, extent_w, extent_h))
    frame_box = geometry.box_vlm_to_frame(box, convention, model, (height, width))
    assert geometry.box_frame_to_vlm(frame_box, convention, model, (height, width)) == box


@given(st.sampled_from(CONVENTIONS), sides, sides, st.data())
def test_frame_boxes_round_trip_within_one_model_unit(convention, height, width, data):
    model = (224, 224)
    extent_w, extent_h = geometry.vlm_extent(convention, model)
    box = tuple(data.draw(st.integers(0, s)) for s in (width, height, width, height))
    back = geometry.box_vlm_to_frame(
        geometry.box_frame_to_vlm(box, convention, model, (height, width)), convention, model,
        (height, width))
    # rounding to the model's grid moves a corner by at most half a model unit
    for value, again, unit in zip(box, back, (width / extent_w, height / extent_h) * 2,
                                  strict=True):
        assert abs(value - again) <= unit / 2 + 1e-9


def test_conventions_scale_as_documented():
    # Qwen2.5-VL: pixels of the 448x336 input; Qwen2-VL: thousandths
    assert geometry.box_vlm_to_frame((224, 168, 448, 336), "absolute", (336, 448),
                                     (101, 77)) == (38.5, 50.5, 77.0, 101.0)
    assert geometry.box_vlm_to_frame((500, 0, 1000, 1000), "relative_1000", (336, 448),
                                     (101, 77)) == (38.5, 0.0, 77.0, 101.0)
    with pytest.raises(InputError, match="box convention"):
        geometry.vlm_extent("normalized", (448, 448))


def test_clip_box_orders_clips_and_refuses():
    assert geometry.clip_box((50.4, 40.6, 10.2, 5.0), (60, 80)) == ((10, 5, 50, 41), None)
    assert geometry.clip_box((-20, -5, 300, 30.2), (60, 80)) == ((0, 0, 80, 30), None)
    box, reason = geometry.clip_box((90, 10, 120, 20), (60, 80))
    assert box is None and reason.startswith("outside the 80x60 frame")
    box, reason = geometry.clip_box((10.2, 10, 10.4, 20), (60, 80))
    assert box is None and reason.startswith("degenerate")
    box, reason = geometry.clip_box((float("nan"), 1, 2, 3), (60, 80))
    assert box is None and reason.startswith("not finite")


def test_box_from_polygon_is_exclusive():
    assert geometry.box_from_polygon(((3, 2), (7.5, 4), (5, 9))) == (3, 2, 8, 10)
    assert geometry.box_from_polygon(()) is None


FRAME = (240, 320)  # height, width; the model input is 448x448 absolute pixels
MODEL = (448, 448)


def parse(text, names=("a", "b")):
    return parse_answer(text, names, "absolute", MODEL, FRAME)


def test_parse_converts_and_reports_each_region():
    text = answer_json([("a", [0, 0, 224, 448]), ("b", None)])
    out = parse(text, ("a", "b", "c"))
    assert out["a"].box == (0, 0, 160, 240) and out["a"].reason is None
    assert out["b"].box is None and out["b"].reason == NOT_VISIBLE
    assert out["c"].box is None and out["c"].reason == NOT_IN_ANSWER


def test_parse_finds_json_in_free_text_and_keeps_the_first_duplicate():
    text = ('Sure! ```json\n[{"bbox_2d": [448, 0, 224, 224], "label": "a"}, '
            '{"bbox_2d": [0, 0, 1, 1], "label": "a"}]\n```')
    assert parse(text)["a"].box == (160, 0, 320, 120)  # corners ordered


@pytest.mark.parametrize("text, fragment", [
    ("no boxes here", "no JSON list"),
    ('[{"bbox_2d": [1, 2, 3], "label": "a"}]', "not 4 numbers"),
    ('[{"bbox_2d": [1, 2, 3, "x"], "label": "a"}]', "not 4 numbers"),
    ('[{"bbox_2d": [1, 2, 3, true], "label": "a"}]', "not 4 numbers"),
    ('[{"bbox_2d": [500, 500, 900, 900], "label": "a"}]', "outside"),
    ('[{"bbox_2d": [10, 10, 10, 90], "label": "a"}]', "degenerate"),
    ('[{"bbox_2d": [1e999, 1, 2, 3], "label": "a"}]', "not finite"),
    ('[{"box": [1, 2, 3, 4], "label": "a"}, 7, "a"]', NOT_IN_ANSWER),
    ('[{"bbox_2d": [1, 2, 3, 4', "no JSON list"),
])
def test_bad_answers_give_none_with_a_reason(text, fragment):
    out = parse(text)["a"]
    assert out.box is None and fragment in out.reason


@given(st.text(max_size=60))
def test_parse_never_raises(text):
    out = parse(text)
    assert set(out) == {"a", "b"}
    assert all((p.box is None) == (p.reason is not None) for p in out.values())


@pytest.mark.parametrize("limit", [0, 7, 9, 10, 99, 100, 448, 1000, 1023, 2000])
def test_number_pattern_is_exactly_zero_to_limit(limit):
    pattern = re.compile(number_pattern(limit))
    accepted = {n for n in range(limit + 200) if pattern.fullmatch(str(n))}
    assert accepted == set(range(limit + 1))
    assert not pattern.fullmatch("01") and not pattern.fullmatch("١٢")  # no zeros, no \d
    assert "\\d" not in number_pattern(limit)


def test_grammar_names_are_escaped_and_the_bound_holds():
    names = ('say "hi"', "back\\slash", "lad")
    grammar = box_grammar(names, 448)
    assert json.dumps(json.dumps(names[0])) in grammar
    assert grammar.count("item") == 2 * len(names)  # each name once, in order
    free = box_grammar(names, 448, "any")
    assert free.count('("," box') == len(names) - 1  # at most one item per name
    longest = answer_json([(names[1], [448] * 4)] * len(names))
    assert max_answer_bytes(names, 448) >= len(longest.encode())
    with pytest.raises(InputError):
        box_grammar((), 448)
    with pytest.raises(InputError):
        box_grammar(names, 448, "some")
