"""Training pairs of the localizer VLM (`rau_rt.train.vlm_data`): what the localizer sends and
what it should answer.

The pair's prompt is checked against the `Localizer` itself: a recording graph runner stands in
for the bundle, and the ids and image patches the localizer feeds its graphs for the same
reference, frame and names must be the pair's. The answer must parse back to the truth boxes
(to the model's coordinate rounding) and be accepted by the constrained decoder's grammar.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the model builder needs the export extra")

from rau_rt.errors import InputError
from rau_rt.localization import Localizer, LocalizerConfig, parse_answer
from rau_rt.localization.constrained import Guidance, box_grammar
from rau_rt.train.vlm_data import IGNORE, PairMaker
from rau_rt.vlm_layout import DECODER, EMBED, VISION

INPUT = 112


@pytest.fixture(scope="module")
def model_layout(tmp_path_factory):
    """A random tiny Qwen2.5-VL folder (the exporter's builder) and its layout at 112 px."""
    import transformers

    from rau_rt.export.vlm import model as vlm_model
    from rau_rt.export.vlm.exporter import make_layout

    folder = vlm_model.build_random(tmp_path_factory.mktemp("vlm") / "model", "tiny")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    return folder, make_layout(model, "qwen2_5_vl", INPUT, hidden_state=False)


@pytest.fixture(scope="module")
def maker(model_layout):
    folder, layout = model_layout
    return PairMaker(layout, (folder / "tokenizer.json").read_text(), augment=False)


class Recorder:
    """A graph runner that records the localizer's feeds and answers end-of-turn at once."""

    def __init__(self, layout):
        self.layout = layout
        self.feeds = {VISION: [], EMBED: []}

    def run(self, graph, feeds):
        layout = self.layout
        if graph == VISION:
            self.feeds[VISION].append(feeds["pixel_values"])
            return {"image_features": np.zeros((layout.tokens_per_image, layout.hidden_size),
                                               np.float32)}
        if graph == EMBED:
            self.feeds[EMBED].append(feeds["input_ids"])
            return {"inputs_embeds": np.zeros((1, feeds["input_ids"].shape[1],
                                               layout.hidden_size), np.float32)}
        assert graph == DECODER
        logits = np.zeros((1, layout.vocab_size), np.float32)
        logits[0, layout.eos_token_ids[0]] = 1.0
        length = feeds["attention_mask"].shape[1]
        present = {name: np.zeros((1, layout.num_kv_heads, length, layout.head_dim),
                                  np.float32) for name in layout.present_names}
        return {"logits": logits, **present}


def test_a_pair_is_the_localizers_own_query(model_layout, maker):
    folder, layout = model_layout
    pair, seed = None, 10_000_000
    while pair is None or all(box is None for box in pair.truth.values()):
        pair, seed = maker.draw(seed), seed + 1
    # the localizer, asked the pair's question on the pair's frame, through a recording runner
    recorder = Recorder(layout)
    parts = _reference_and_frame(maker, seed - 1)
    localizer = Localizer(recorder, parts["reference"],
                          LocalizerConfig(constrained=False, prefix_cache=False),
                          layout=layout, tokenizer_json=(folder / "tokenizer.json").read_text())
    localizer.locate(parts["frame"], pair.names)
    (prompt,) = recorder.feeds[EMBED][:1]
    answer_at = int(np.argmax(pair.labels[0] != IGNORE))
    np.testing.assert_array_equal(prompt, pair.ids[:, :answer_at])
    target, *reference_images = recorder.feeds[VISION]  # the frame first, then the reference
    for fed, ours in zip([*reference_images, target], pair.patches, strict=True):
        np.testing.assert_array_equal(fed, ours)


def _reference_and_frame(maker, seed):
    """The reference and 8-bit frame `maker.draw(seed)` used (its `query`)."""
    query = maker.query(seed)
    return {"reference": query.reference, "frame": query.frame}


def test_the_answer_parses_back_to_the_truth_and_fits_the_grammar(model_layout, maker):
    folder, layout = model_layout
    fam = layout.family_constants
    guidance = Guidance((folder / "tokenizer.json").read_text(), layout.vocab_size,
                        layout.eos_token_ids)
    boxes = nulls = 0
    for seed in range(10_000_000, 10_000_012):
        pair = maker.draw(seed)
        if pair is None:
            continue
        parsed = parse_answer(pair.answer, pair.names, fam.box_convention, layout.input_size,
                              pair.frame_size)
        step = max(pair.frame_size) / INPUT  # one model-input pixel, in frame pixels
        for name, truth in pair.truth.items():
            got = parsed[name].box
            if truth is None:
                assert got is None and parsed[name].reason is not None
                nulls += 1
            else:
                assert got is not None
                assert np.abs(np.subtract(got, truth)).max() <= step + 1, (name, got, truth)
                boxes += 1
        # the constrained decoder accepts exactly these answer tokens, then stops
        answer = pair.ids[0, pair.labels[0] != IGNORE].tolist()
        assert answer[-1] == maker.tokenizer.token_to_id("<|im_end|>")
        constraint = guidance.matcher(guidance.compile(box_grammar(pair.names, INPUT)))
        for token in answer[:-1]:
            assert constraint.allowed()[token], maker.tokenizer.decode([token])
            constraint.advance(token)
        assert constraint.is_stopped()
    assert boxes >= 5 and nulls >= 1  # both kinds of answer were drawn


def test_a_grounding_pair_asks_one_region_in_the_target_alone(model_layout, maker):
    """The pretext task: the localizer's request and answer form for one region, with the
    target as the only image (no reference); the answer parses back to the truth, a segment
    the frame does not show answers null, and the frame effect is measured on that image."""
    import torch
    import transformers

    from rau_rt.localization import prompts
    from rau_rt.train.vlm_trainer import evaluate

    folder, layout = model_layout
    grounding = PairMaker(layout, (folder / "tokenizer.json").read_text(), augment=False,
                          task="ground")
    pairs = [grounding.draw(seed) for seed in range(10_000_000, 10_000_016)]
    assert all(p is not None and len(p.names) == 1 and len(p.patches) == 1 for p in pairs)
    shown = sum(p.truth[p.names[0]] is not None for p in pairs)
    assert 0 < shown < len(pairs)  # mostly a segment in view, sometimes one that is not
    fam = layout.family_constants
    for pair in pairs:
        text = grounding.tokenizer.decode(pair.ids[0, :pair.answer_start].tolist())
        assert text.count(prompts.TARGET_INTRO.strip()) == 1
        assert prompts.REFERENCE_INTRO not in text
        assert prompts.locate_request(pair.names).strip() in text
        merged = pair.patches[0].shape[0] // 4  # merge 2 x 2
        assert (pair.ids[0] == layout.image_token_id).sum() == merged
        [name] = pair.names
        got = parse_answer(pair.answer, pair.names, fam.box_convention, pair.input_sizes[0],
                           pair.frame_size)[name].box
        assert (got is None) == (pair.truth[name] is None)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    scores = evaluate(model, grounding, pairs[:2])
    assert scores["frame_effect"] > 0.0  # random weights read their one image too
    with pytest.raises(ValueError, match="task"):
        PairMaker(layout, (folder / "tokenizer.json").read_text(), task="detect")


def test_a_reading_pair_is_a_grounding_pair_with_the_segment_drawn(model_layout):
    """The pretext's pretext: the same query as grounding on the same seed, but a segment the
    frame shows is drawn on it as a reference's regions are (its box in the first colour of
    the palette), so the answer is the drawn box; a segment not shown leaves the frame as it
    is."""
    from rau_rt import ops

    folder, layout = model_layout
    tokenizer = (folder / "tokenizer.json").read_text()
    ground = PairMaker(layout, tokenizer, augment=False, task="ground")
    read = PairMaker(layout, tokenizer, augment=False, task="read")
    drawn = blank = 0
    for seed in range(10_000_000, 10_000_016):
        plain, marked = ground.query(seed), read.query(seed)
        assert marked.names == plain.names and marked.truth == plain.truth
        box = marked.truth[marked.names[0]]
        if box is None:
            np.testing.assert_array_equal(marked.frame, plain.frame)
            blank += 1
            continue
        assert marked.frame.shape == (*plain.frame.shape[:2], 3)
        x1, y1, x2, y2 = box
        if marked.frame.shape[0] == marked.frame.shape[1]:  # not reframed: box as drawn
            colour = np.asarray(ops.PALETTE[0], np.uint8)
            assert (marked.frame[y2 - 1, x1:x2] == colour).all()  # the box's bottom edge
            assert (marked.frame[y1:y2, x2 - 1] == colour).all()  # and its right edge
            drawn += 1
        assert (marked.frame[..., 0] != marked.frame[..., 1]).any()
        pair = read.pair(None, marked.frame, marked.names, marked.truth)
        assert len(pair.patches) == 1 and pair.answer == ground.pair(
            None, plain.frame, plain.names, plain.truth).answer
    assert drawn and blank


def test_the_default_grammar_wants_every_region_in_order(model_layout, maker):
    """The "every" form (the localizer's default) rejects an answer that drops or reorders a
    region; "any" takes both."""
    folder, layout = model_layout
    guidance = Guidance((folder / "tokenizer.json").read_text(), layout.vocab_size,
                        layout.eos_token_ids)

    def accepts(form: str, text: str) -> bool:
        constraint = guidance.matcher(guidance.compile(box_grammar(("a", "b"), INPUT, form)))
        for token in maker.tokenizer.encode(text, add_special_tokens=False).ids:
            if not constraint.allowed()[token]:
                return False
            constraint.advance(token)
        return constraint.is_stopped()

    both = '[{"label":"a","bbox_2d":[1,2,30,40]},{"label":"b","bbox_2d":null}]'
    swapped = '[{"label":"b","bbox_2d":null},{"label":"a","bbox_2d":[1,2,30,40]}]'
    only_a = '[{"label":"a","bbox_2d":[1,2,30,40]}]'
    three = "[" + ",".join(['{"label":"a","bbox_2d":null}'] * 3) + "]"
    box_first = '[{"bbox_2d":[1,2,30,40],"label":"a"},{"bbox_2d":null,"label":"b"}]'
    assert accepts("every", both) and accepts("any", both)
    assert not accepts("every", swapped) and accepts("any", swapped)
    assert not accepts("every", only_a) and accepts("any", only_a)
    assert not accepts("every", three) and not accepts("any", three)  # at most one per region
    assert not accepts("every", box_first) and not accepts("any", box_first)  # label first


def test_pairs_are_reproducible_and_only_the_answer_is_labelled(maker):
    first, second = maker.draw(10_000_003), maker.draw(10_000_003)
    np.testing.assert_array_equal(first.ids, second.ids)
    for a, b in zip(first.patches, second.patches, strict=True):
        np.testing.assert_array_equal(a, b)
    labelled = first.labels[0] != IGNORE
    assert labelled.sum() == first.answer_tokens and labelled[-first.answer_tokens:].all()
    np.testing.assert_array_equal(first.labels[0, labelled], first.ids[0, labelled])
    text = maker.tokenizer.decode(first.ids[0, labelled][:-1].tolist())
    assert text == first.answer
    other = maker.draw(10_000_004)
    assert other.ids.shape != first.ids.shape or (other.ids != first.ids).any()


def test_three_steps_on_a_fixed_pair_lower_the_loss(maker, model_layout):
    import torch
    import transformers

    from rau_rt.train.vlm_trainer import pair_loss

    folder, _ = model_layout
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pair = maker.draw(10_000_000)
    losses = []
    for _ in range(4):
        loss = pair_loss(model, pair)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[3] < losses[0]


def test_a_flipped_context_shows_other_values_and_teaches_only_the_rest(model_layout):
    """With flips, the answer the model reads has some earlier items' values flipped (box <->
    null); exactly those values are unlabelled, the probe keeps only their deciding token, and
    the pair's truth is the query's."""
    folder, layout = model_layout
    tokenizer = (folder / "tokenizer.json").read_text()
    plain, flipping = (PairMaker(layout, tokenizer, flips=f) for f in (0.0, 1.0))
    seed = next(s for s in range(10_000_000, 10_000_100)
                if (p := plain.draw(s)) is not None and len(p.names) > 1)
    truth, pair = plain.draw(seed), flipping.draw(seed)
    assert pair.answer == truth.answer and pair.truth == truth.truth
    start = int(np.argmax(pair.labels[0] != IGNORE))
    shown_text = flipping.tokenizer.decode(pair.ids[0, start:-1].tolist())
    shown, want = json.loads(shown_text), json.loads(pair.answer)
    flipped = [i for i, (a, b) in enumerate(zip(shown, want, strict=True))
               if a["bbox_2d"] != b["bbox_2d"]]
    assert flipped and len(pair.names) - 1 not in flipped
    assert all((shown[i]["bbox_2d"] is None) != (want[i]["bbox_2d"] is None) for i in flipped)
    answer = slice(start, pair.ids.shape[1])
    ignored = pair.labels[0, answer] == IGNORE
    tokens = [flipping.tokenizer.id_to_token(int(t)) for t in pair.ids[0, answer]]
    assert "".join(t for t, i in zip(tokens, ignored, strict=True) if i) == "".join(
        json.dumps(shown[i]["bbox_2d"], separators=(",", ":")) for i in flipped)
    np.testing.assert_array_equal(pair.labels[0, answer][~ignored],
                                  pair.ids[0, answer][~ignored])
    for i in flipped:  # one probe row: the token before the value, whose prediction decides it
        [row] = pair.box_tokens[pair.box_tokens[:, 1] == i, 0]
        assert ignored[row + 1] and not ignored[row]


def test_the_frame_effect_measures_whether_the_decisions_read_the_target(maker, model_layout):
    """`decisions` gives one box-vs-null logit per requested region; a model's answer moves
    with its target frame (random weights read it too), and not at all for a target that is
    already the black frame the check swaps in."""
    from dataclasses import replace

    import torch
    import transformers

    from rau_rt.localization.localizer import image_patches
    from rau_rt.train.vlm_trainer import decisions, evaluate

    folder, layout = model_layout
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()
    pair = maker.draw(10_000_003)
    black = replace(pair, patches=(*pair.patches[:2], image_patches(
        np.zeros(pair.frame_size, np.uint8), layout, "rgb")))
    with torch.no_grad():
        seen, dark = decisions(model, maker, pair), decisions(model, maker, black)
    assert seen.shape == (len(pair.names),) and np.abs(seen - dark).max() > 1e-3
    scores = evaluate(model, maker, [black])
    assert scores["frame_effect"] == 0.0 and 0.0 <= scores["forced_presence"] <= 1.0


def test_box_tokens_are_the_tokens_before_each_items_box(maker):
    """The answer probe's positions: the tokens whose next token spells item i's box value."""
    from rau_rt.train.vlm_data import box_tokens

    answer = '[{"label":"9","bbox_2d":[88,94,114,103]},{"label":"10","bbox_2d":null}]'
    encoded = maker.tokenizer.encode(answer, add_special_tokens=False)
    rows = box_tokens(answer, encoded.offsets)
    spelled = {item: "".join(encoded.tokens[t + 1] for t, i in rows if i == item)
               for item in (0, 1)}
    assert spelled == {0: "[88,94,114,103]", 1: "null"}
    pair = maker.draw(10_000_003)
    assert set(pair.box_tokens[:, 1]) == set(range(len(pair.names)))
    assert pair.box_tokens[:, 0].max() < pair.answer_tokens


def test_the_auxiliary_cells_mark_where_the_segments_are(model_layout):
    """The dense targets of the trainer's probes: every visible requested segment's box
    centre lies in an occupied cell of its channel, its box in `boxes` is its truth box, and
    the grid is the target's bucket; probe steps lower their loss."""
    import torch
    import transformers

    from rau_rt.geometry import box_iou
    from rau_rt.synthetic import SEGMENTS
    from rau_rt.train.vlm_trainer import AuxHead, forward

    folder, layout = model_layout
    cells_maker = PairMaker(layout, (folder / "tokenizer.json").read_text(), augment=False,
                            cells=True)
    checked = 0
    for seed in range(10_000_100, 10_000_130):
        query = cells_maker.query(seed)
        if query is None:
            continue
        rows, cols = layout.merged_grid(layout.size_for(query.frame.shape))
        assert query.cells.shape == (rows * cols, len(SEGMENTS))
        grid = query.cells.reshape(rows, cols, len(SEGMENTS))
        height, width = query.frame.shape[:2]
        for name, box in query.truth.items():
            channel = grid[:, :, SEGMENTS.index(name)]
            if box is None:
                continue
            cy, cx = (box[1] + box[3]) / 2, (box[0] + box[2]) / 2
            near = channel[max(0, int(cy * rows / height) - 1):int(cy * rows / height) + 2,
                           max(0, int(cx * cols / width) - 1):int(cx * cols / width) + 2]
            assert near.any(), (seed, name)
            fraction = query.boxes[SEGMENTS.index(name)]
            assert box_iou(tuple(fraction * [width, height, width, height]), box) > 0.9
            checked += 1
    assert checked >= 10
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).train()
    head = AuxHead(model)
    optimizer = torch.optim.AdamW(head.heads.parameters(), lr=1e-2)
    pair = cells_maker.draw(10_000_000)
    losses = []
    for _ in range(3):
        loss, terms = head.loss(pair, forward(model, pair, hidden_states=True))
        assert set(terms) == {"occupancy", "relative_box", "cell", "absolute_box",
                              "answer_presence", "answer_box"}
        assert terms["relative_box"] > 0 and terms["absolute_box"] > 0  # segments reach cells
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[2] < losses[0]


def test_training_resumes_where_it_stopped_and_leaves_a_model_folder(tmp_path):
    import json

    import torch
    import transformers

    from rau_rt.train.vlm_trainer import VlmTrainConfig, train

    cfg = VlmTrainConfig(size="tiny", input_size=INPUT, steps=3, validate_every=3,
                         validation_pairs=2, warmup=1)
    straight = train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", minutes=0)  # stops before the first step, checkpointed
    stopped = json.loads((tmp_path / "resumed" / "record.json").read_text())
    assert stopped["steps_done"] == 0
    with pytest.raises(InputError, match="--resume"):
        train(cfg, tmp_path / "resumed")
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    assert resumed["steps_done"] == straight["steps_done"] == 3
    assert resumed["pair_seeds"] == straight["pair_seeds"]
    assert set(resumed["validation"][-1]) == {"step", "hit_rate", "mean_iou", "presence_f1",
                                              "forced_presence", "frame_effect"}
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "resumed" / "model")
    state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=False)["model"]
    other = torch.load(tmp_path / "straight" / "train_state.pt", weights_only=False)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], msg=name)  # the folder is the state
        torch.testing.assert_close(state[name], other[name], msg=name)  # and the same run
    assert (tmp_path / "resumed" / "model" / "tokenizer.json").is_file()
    assert (tmp_path / "resumed" / "vlm.fp16.safetensors").is_file()


def test_a_run_can_start_from_another_runs_weights(tmp_path):
    """`init`: a locate run starts from a grounding run's fp16 weights (the pretext, then the
    task), and its record names the file it started from with that run's record."""
    import json

    import torch
    from safetensors.torch import load_file

    from rau_rt.train.vlm_trainer import WEIGHTS_FILE, VlmTrainConfig, train

    base = VlmTrainConfig(size="tiny", input_size=INPUT, steps=2, validate_every=2,
                          validation_pairs=1, warmup=1)
    train(VlmTrainConfig(**{**base.__dict__, "task": "ground"}), tmp_path / "ground")
    weights = tmp_path / "ground" / WEIGHTS_FILE
    cfg = VlmTrainConfig(**{**base.__dict__, "init": str(weights)})
    record = train(cfg, tmp_path / "locate", minutes=0)  # checkpointed before its first step
    assert record["init"]["record"]["config"]["task"] == "ground"
    assert record["init"]["sha256"] == json.loads(
        (tmp_path / "ground" / "record.json").read_text())["weights"]["sha256"]
    started = torch.load(tmp_path / "locate" / "train_state.pt", weights_only=False)["model"]
    for name, value in load_file(weights).items():
        torch.testing.assert_close(started[name], value.float(), msg=name)
    with pytest.raises(InputError, match="no such file"):
        VlmTrainConfig(init=str(tmp_path / "missing.safetensors"))
    with pytest.raises(InputError, match="tiny model, not micro"):
        train(VlmTrainConfig(init=str(weights), steps=1), tmp_path / "micro", minutes=0)


def test_pairs_per_step_draw_that_many_pairs_for_each_step(tmp_path):
    """`pairs_per_step`: two steps of two pairs go through the same pair seeds as four steps
    of one, and the record says so."""
    from rau_rt.train.vlm_trainer import VlmTrainConfig, train

    base = VlmTrainConfig(size="tiny", input_size=INPUT, steps=4, validate_every=4,
                          validation_pairs=1, warmup=1, aux_weight=0.0)
    single = train(base, tmp_path / "single")
    double = train(VlmTrainConfig(**{**base.__dict__, "steps": 2, "pairs_per_step": 2}),
                   tmp_path / "double")
    assert double["steps_done"] == 2 and double["config"]["pairs_per_step"] == 2
    assert double["pair_seeds"] == single["pair_seeds"]
    with pytest.raises(InputError, match="pairs_per_step"):
        VlmTrainConfig(pairs_per_step=0)
