"""`Localizer` on a tiny random-init Qwen2.5-VL bundle (exported once per module, 224-px input).

Random weights answer nonsense, so these tests check the machinery: the prompt's ids are the
ones transformers' processor makes for the same conversation, the reference prefix cache
changes no token, the constrained answer always parses, and the runtime decode loop agrees
with the export verifier's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from rau_rt import geometry
from rau_rt.bundle import load_bundle
from rau_rt.config import EngineConfig
from rau_rt.errors import InputError
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.localization import Decoder, Localizer, LocalizerConfig, prompts
from rau_rt.localization.parse import NOT_IN_ANSWER, NOT_VISIBLE
from rau_rt.reference import Reference
from rau_rt.types import Frame, Region
from rau_rt.vlm_layout import DEFAULT_SYSTEM, family, read_layout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

INPUT = 224  # a 16x16 patch grid: 64 tokens per image, three images per prompt
NAMES = ("lad", "lcx", "rca")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rau_rt.export.vlm import model as vlm_model

    return vlm_model.build_random(tmp_path_factory.mktemp("loc") / "model", "tiny")


@pytest.fixture(scope="module")
def bundle_dir(model_dir, tmp_path_factory):
    from rau_rt.export import vlm

    out = tmp_path_factory.mktemp("loc") / "bundle"
    vlm.export_vlm(vlm.VlmExportConfig(out=out, model=model_dir, input_size=INPUT))
    return out


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    with load_bundle(bundle_dir, config=EngineConfig(precision="fp32")) as loaded:
        yield loaded


def make_reference(size=(INPUT, INPUT), seed=0) -> Reference:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, bool)
    mask[size[0] // 4:size[0] // 2, size[1] // 3:size[1] - 5] = True
    return Reference(image, (Region("lad", box=(10, 20, 100, 150)),
                             Region("lcx", polygon=((30, 40), (200, 60), (120, 210))),
                             Region("rca", mask=mask)))


@pytest.fixture(scope="module")
def reference():
    return make_reference()


@pytest.fixture(scope="module")
def cached(bundle, reference):
    return Localizer(bundle, reference)


@pytest.fixture(scope="module")
def uncached(bundle, reference):
    return Localizer(bundle, reference, LocalizerConfig(prefix_cache=False))


def hf_ids(model_dir, parts, images) -> np.ndarray:
    """transformers' processor ids for the same conversation (the exporter's processor set-up)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    out = vlm_verify.hf_inputs(images, tokenizer, family("qwen2_5_vl"), parts)
    return out["input_ids"].numpy()


def test_prompt_ids_match_the_transformers_processor(model_dir, bundle_dir, cached, reference):
    layout = read_layout(bundle_dir)
    parts = prompts.locate_parts(reference, layout, ["rca", "lad"])
    target = np.random.default_rng(5).integers(0, 256, (INPUT, INPUT, 3), dtype=np.uint8)
    expected = hf_ids(model_dir, parts.parts,
                      [reference.image, prompts.annotated_image(reference), target])
    ours = cached.prompt_ids(parts)
    np.testing.assert_array_equal(ours, expected)
    # the cached prefix is exactly the ids before the target image
    assert cached.prefix_tokens == int(np.flatnonzero(
        expected[0] == layout.vision_start_token_id)[2])
    text = parts.prefix_text() + parts.tail_text()
    assert '"label":"lad"' in text and "pixels of the 224x224 image" in text


def test_reference_boxes_in_the_prompt_use_the_model_convention(bundle_dir):
    layout = read_layout(bundle_dir)
    ref = make_reference(size=(448, 336))  # boxes scale by 224/336 in x, 224/448 in y
    listed = prompts.reference_parts(ref, layout)[4].split("\n", 2)[2]
    boxes = {item["label"]: item["bbox_2d"] for item in json.loads(listed)}
    assert boxes["lad"] == [round(10 * 224 / 336), round(20 * 224 / 448), round(100 * 224 / 336),
                            round(150 * 224 / 448)]
    assert set(boxes) == set(NAMES)


def test_annotated_image_draws_every_region(reference):
    drawn = prompts.annotated_image(reference)
    assert drawn.shape == reference.image.shape and drawn.dtype == np.uint8
    changed = np.any(drawn != reference.image, axis=2)
    for region in reference.regions:
        x1, y1, x2, y2 = reference.box(region)
        assert changed[y1:y2, x1:x2].any(), region.name
    assert not np.array_equal(drawn, reference.image)


def test_cached_and_uncached_queries_give_identical_tokens(cached, uncached):
    rng = np.random.default_rng(1)
    for shape in ((INPUT, INPUT, 3), (333, 517, 3), (97, 151, 3)):
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        fast, slow = cached.locate_result(frame), uncached.locate_result(frame)
        assert fast.text == slow.text and fast.generated_tokens == slow.generated_tokens
        assert fast.boxes == slow.boxes
        assert fast.cached and not slow.cached
        assert slow.prompt_tokens == fast.prompt_tokens + cached.prefix_tokens
        question = "Where is the lad relative to the rca?"
        assert cached.ask(frame, question) == uncached.ask(frame, question)


def test_min_new_tokens_masks_the_stop_ids_until_reached(bundle, bundle_dir, cached,
                                                        reference):
    """`generate(min_new_tokens=...)`, what the exporter compares with transformers' `generate`:
    a stop id the free answer picks at position k ends the answer there, unless k tokens are
    required, then the next best token is taken instead."""
    layout = read_layout(bundle_dir)
    parts = prompts.ask_parts(reference, layout, "Describe the target.")
    ids = cached.prompt_ids(parts)
    target = np.random.default_rng(2).integers(0, 256, (INPUT, INPUT, 3), dtype=np.uint8)
    patches = [cached.patches(reference.image, "rgb"),
               cached.patches(prompts.annotated_image(reference), "rgb"),
               cached.patches(target, "rgb")]
    decoder = Decoder(bundle, layout)
    features = decoder.image_features(patches)
    free = decoder.generate(ids, features, max_new_tokens=16, stop_ids=(), keep_logits=True)
    assert free.stop_reason == "max_tokens" and len(free.logits) == len(free.tokens) == 16
    assert len(set(free.tokens)) > 3  # context-dependent, so a position error would show
    assert [int(np.argmax(x)) for x in free.logits] == list(free.tokens)
    stop = free.tokens[3]
    k = free.tokens.index(stop)
    early = decoder.generate(ids, features, max_new_tokens=16, stop_ids=[stop])
    assert early.tokens == free.tokens[:k] and early.stop_reason == "eos"
    late = decoder.generate(ids, features, max_new_tokens=16, min_new_tokens=k + 1,
                            stop_ids=[stop])
    runner_up = int(np.argsort(free.logits[k])[-2])
    assert late.tokens[:k + 1] == (*free.tokens[:k], runner_up)
    with pytest.raises(InputError, match="min_new_tokens"):
        decoder.generate(ids, features, max_new_tokens=4, min_new_tokens=5)


def test_every_constrained_answer_parses(cached):
    rng = np.random.default_rng(7)
    allowed_reasons = {NOT_IN_ANSWER, NOT_VISIBLE}
    located = 0
    for _ in range(50):
        height, width = (int(v) for v in rng.integers(40, 700, 2))
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        names = tuple(rng.permutation(NAMES)[:int(rng.integers(1, 4))])
        result = cached.locate_result(frame, names)
        assert result.stop_reason == "grammar", result.text
        items = json.loads(result.text)  # the grammar's language is JSON
        assert isinstance(items, list) and len(items) <= len(names)
        assert " " not in result.text
        for item in items:
            assert set(item) == {"bbox_2d", "label"} and item["label"] in names
            assert item["bbox_2d"] is None or all(0 <= v <= INPUT for v in item["bbox_2d"])
        assert set(result.boxes) == set(names)
        for name, box in result.boxes.items():
            if box is None:
                reason = result.reasons[name]
                assert reason in allowed_reasons or reason.startswith(
                    ("degenerate", "outside")), reason
            else:
                located += 1
                x1, y1, x2, y2 = box
                assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert located > 0  # the test saw boxes, not only empty answers


def test_frames_of_every_kind(cached):
    rng = np.random.default_rng(3)
    gray16 = Frame(0, 0.0, rng.integers(0, 4096, (120, 90), dtype=np.uint16), "gray", 12)
    bgr = Frame(1, 0.1, rng.integers(0, 256, (120, 90, 3), dtype=np.uint8), "bgr", 8)
    for frame in (gray16, bgr):
        result = cached.locate_result(frame, ["lad"])
        assert result.frame_size == (120, 90) and set(result.boxes) == {"lad"}
    with pytest.raises(InputError, match="Frame or an image array"):
        cached.locate([[0, 1]], ["lad"])


def test_a_frames_voi_window_reaches_the_vision_input(cached, monkeypatch):
    """A 12-bit frame with a DICOM window is seen as its windowed 8-bit view would be."""
    rng = np.random.default_rng(4)
    raw = rng.integers(1000, 2001, (112, 112), dtype=np.uint16)  # inside: no clamping
    window = (1500.0, 1000.0)
    view = np.clip((raw.astype(np.float32) - 1000.0) * 0.255 + 0.5, 0, 255).astype(np.uint8)
    expected = cached.patches(np.repeat(view[:, :, None], 3, axis=2), "rgb")
    seen = []
    patches = cached.patches
    monkeypatch.setattr(cached, "patches", lambda *a: seen.append(patches(*a)) or seen[-1])
    cached.locate_result(Frame(0, 0.0, raw, "gray", 12, window), ["lad"])
    # 8-bit rounding of the view: half a level over CLIP's smallest std
    np.testing.assert_allclose(seen[0], expected, atol=0.5 / 255 / 0.26 + 1e-6)
    unwindowed = cached.patches(raw, "rgb", 12)
    assert np.abs(unwindowed - expected).max() > 0.5


def test_unknown_region_and_token_bound(bundle, reference, cached):
    frame = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InputError, match=r"\['aorta'\] are not annotated"):
        cached.locate(frame, ["aorta"])
    short = Localizer(bundle, reference, LocalizerConfig(max_new_tokens=3))
    result = short.locate_result(frame, ["lad", "rca"])
    assert result.stop_reason == "max_tokens" and result.generated_tokens == 3
    assert all(box is None for box in result.boxes.values())  # a cut answer is no answer
    assert all(reason.startswith("no JSON list") for reason in result.reasons.values())


def test_cancel_ends_the_running_query_at_its_next_step(bundle, reference, monkeypatch):
    localizer = Localizer(bundle, reference)
    frame = np.zeros((64, 64, 3), np.uint8)
    real, steps = localizer._decoder.step, []

    def step(tokens, cache):  # the worker's timeout fires during the first decoder step
        steps.append(len(tokens))
        localizer.cancel()
        return real(tokens, cache)

    monkeypatch.setattr(localizer._decoder, "step", step)
    cut = localizer.locate_result(frame, ["lad", "rca"])
    assert cut.stop_reason == "cancelled" and len(steps) == 1
    monkeypatch.undo()
    assert localizer.locate_result(frame, ["lad", "rca"]).stop_reason != "cancelled"


@pytest.mark.parametrize("text", ["{not json", '{"model": {"type": "Nonsense"}}', ""])
def test_a_garbage_tokenizer_is_a_bundle_error(bundle, reference, text):
    from rau_rt.errors import BundleError

    with pytest.raises(BundleError, match=r"tokenizer\.json: not a tokenizer"):
        Localizer(bundle, reference, tokenizer_json=text)


def test_free_decoding_never_crashes_the_parser(bundle, reference):
    free = Localizer(bundle, reference, LocalizerConfig(constrained=False, max_new_tokens=24))
    rng = np.random.default_rng(11)
    for _ in range(3):
        result = free.locate_result(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
        assert set(result.boxes) == set(NAMES)
        assert all(result.reasons[n] for n, b in result.boxes.items() if b is None)


class CountingRunner:
    """The bundle, counting decoder calls."""

    def __init__(self, bundle):
        self.bundle, self.directory, self.decoder_calls = bundle, bundle.directory, 0

    def run(self, graph, feeds):
        self.decoder_calls += graph == "vlm_decoder"
        return self.bundle.run(graph, feeds)


def test_forced_tokens_share_decoder_calls(bundle, reference):
    counting = CountingRunner(bundle)
    localizer = Localizer(counting, reference)
    rng = np.random.default_rng(4)
    for _ in range(5):
        counting.decoder_calls = 0
        result = localizer.locate_result(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
        if '"label"' in result.text:  # at least one item: its keys are forced
            break
    # one prefill, then one call per chosen token; `{"label":`, the name and `,"bbox_2d":` ride
    # along
    assert counting.decoder_calls < result.generated_tokens


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_relative_1000_families_answer_in_thousandths(tmp_path, reference, family):
    """Qwen2-VL and Qwen3-VL (deepstack: the target's rows enter with the tail prefill, the
    reference images' with the cached prefix) answer in thousandths of the frame."""
    from rau_rt.export import vlm

    out = tmp_path / family
    vlm.export_vlm(vlm.VlmExportConfig(out=out, random_init="tiny", family=family,
                                       input_size=INPUT))
    layout = read_layout(out)
    assert layout.family_constants.box_convention == "relative_1000"
    assert layout.deepstack_layers == (2 if family == "qwen3_vl" else 0)
    listed = json.loads(prompts.reference_parts(reference, layout)[4].split("\n", 2)[2])
    assert listed[0]["bbox_2d"] == [round(v * 1000 / INPUT) for v in (10, 20, 100, 150)]
    rng = np.random.default_rng(9)
    with load_bundle(out, config=EngineConfig(precision="fp32")) as loaded:
        localizer = Localizer(loaded, reference)
        uncached = Localizer(loaded, reference, LocalizerConfig(prefix_cache=False))
        # the default system turn is the family's template's: none for Qwen3-VL
        assert localizer.system == (None if family == "qwen3_vl" else DEFAULT_SYSTEM)
        assert Localizer(loaded, reference, LocalizerConfig(system="Find.")).system == "Find."
        coordinates = []
        for _ in range(6):
            frame = rng.integers(0, 256, (150, 250, 3), dtype=np.uint8)
            result = localizer.locate_result(frame)
            assert result.stop_reason == "grammar"
            assert uncached.locate_result(frame).text == result.text
            for item in json.loads(result.text):
                if item["bbox_2d"]:
                    coordinates += item["bbox_2d"]
                    # thousandths of the frame (250 x 150), not of the 224-px model input
                    x1, y1, x2, y2 = item["bbox_2d"]
                    expected, _ = geometry.clip_box((x1 * 0.25, y1 * 0.15, x2 * 0.25, y2 * 0.15),
                                                    (150, 250))
                    assert result.boxes[item["label"]] == expected
    # thousandths, not input pixels: the grammar's bound is 1000 (values above 224 occur)
    assert coordinates and INPUT < max(coordinates) <= 1000
