"""`rau-rt train vlm`: the demo localizer, a small Qwen2.5-VL trained on synthetic pairs.

The model is `Qwen2_5_VLForConditionalGeneration` of the exporter's `micro` size (text 256 x 4
layers, vision 256 x 4 blocks, patch 14, merge 2; `rau_rt.export.vlm.model.RANDOM_INIT`) with the
project's local tokenizer, built from random initialisation (or from an earlier run's weights,
`init`), so what it produces is a Hugging Face folder like a user's fine-tune: `rau-rt export
vlm --model DIR/model` takes it on the user's path. `pairs_per_step` pairs a step
(`rau_rt.train.vlm_data`: the localizer's own prompt, the truth answer; or with `task="ground"`
its pretext, one named region in the target alone, and with `task="read"` that region drawn on
the target), cross-entropy on the answer tokens only, AdamW with warm-up and cosine decay,
gradients averaged over the step's pairs and clipped at norm 1; resumable like `rau-rt train
sam2`.

Validation (fixed pairs from VALIDATION_SEEDS, unaugmented) decodes greedily with transformers
under the localizer's answer grammar and parses the answer as the localizer does: box hit rate
(IoU >= 0.5 per visible requested segment), mean IoU and presence F1.

Files in `--out`:
    train_state.pt  the resumable state (written atomically every `checkpoint_minutes`)
    model/          the Hugging Face folder of the latest checkpoint (config, weights, tokenizer)
    vlm.fp16.safetensors  the same weights in fp16, as the repository ships them
    record.json     command, seeds, steps, wall time, losses, validation, versions, commit
    curve.png       loss and validation over steps
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from rau_rt.errors import InputError
from rau_rt.geometry import box_iou
from rau_rt.localization.localizer import image_patches
from rau_rt.synthetic import SEGMENTS
from rau_rt.train import TRAIN_SEEDS, VALIDATION_SEEDS
from rau_rt.train.loop import History, Position, prefetched, run_steps, state_file
from rau_rt.train.record import (
    LICENCE,
    init_record,
    save_atomic,
    save_fp16_safetensors,
    training_record,
    write_curve,
    write_json_atomic,
)
from rau_rt.train.vlm_data import TASKS, Pair, PairMaker, deciding
from rau_rt.vlm_layout import FAMILIES

SIZES = ("micro", "tiny")  # micro: the demo localizer; tiny: tests
FAMILY = "qwen2_5_vl"
WEIGHTS_FILE = "vlm.fp16.safetensors"
# A segment reaches a few percent of the target's cells: occupied cells weigh this much more,
# so the probe cannot settle on "nothing anywhere".
AUX_POS_WEIGHT = 10.0


@dataclass(frozen=True)
class VlmTrainConfig:
    """Everything that determines a training run (recorded in record.json)."""

    size: str = "micro"
    input_size: int = 224  # the square vision input (multiple of patch x merge = 28); other
    # aspects at its pixel budget (`rau_rt.vlm_layout.aspect_sizes`)
    steps: int = 9000  # ~80 min on 2 cores (a step of one pair is ~0.5 s)
    pairs_per_step: int = 1  # gradients averaged over this many pairs per optimizer step
    lr: float = 5e-4
    aux_weight: float = 1.0  # the probes' dense losses (`AuxHead`; 0: off)
    flips: float = 0.5  # share of pairs whose answer context is flipped (`vlm_data.flip_context`)
    task: str = "locate"  # the localizer's query, or a pretext: "ground", "read" (`vlm_data.TASKS`)
    weight_decay: float = 0.05
    warmup: int = 300
    grad_clip: float = 1.0
    seed: int = 0  # model init and torch's RNG
    init: str | None = None  # a run's `WEIGHTS_FILE` to start from (e.g. its pretext); None: random
    first_pair_seed: int = TRAIN_SEEDS.start
    checkpoint_minutes: float = 5.0
    validate_every: int = 1500
    validation_pairs: int = 16
    threads: int = 2

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise InputError(f"size {self.size!r}: expected one of {SIZES}")
        if self.input_size < 28 or self.input_size % 28:
            raise InputError(f"input_size {self.input_size}: expected a multiple of 28 "
                             "(patch 14 x merge 2)")
        if self.task not in TASKS:
            raise InputError(f"task {self.task!r}: expected one of {TASKS}")
        if not 0 <= self.flips <= 1:
            raise InputError(f"flips {self.flips}: a share, expected 0..1")
        if min(self.steps, self.pairs_per_step, self.validate_every, self.validation_pairs) < 1:
            raise InputError("steps, pairs_per_step, validate_every and validation_pairs must "
                             "be >= 1")
        if self.init is not None and not Path(self.init).is_file():
            raise InputError(f"init {self.init}: no such file")
        if self.first_pair_seed not in TRAIN_SEEDS:
            raise InputError(f"first_pair_seed {self.first_pair_seed}: training seeds are "
                             f"{TRAIN_SEEDS.start}..{TRAIN_SEEDS.stop - 1} (disjoint from the "
                             "validation and held-out seeds)")


def build(cfg: VlmTrainConfig, folder: Path):
    """The model folder a run starts from at `folder`, loaded: (model, layout, maker). Random
    of `cfg.size`, or holding the weights of `cfg.init` (which must be of that size)."""
    import torch

    from rau_rt.export.vlm.model import build_random

    torch.manual_seed(cfg.seed)
    if cfg.init is None:
        build_random(folder, cfg.size, FAMILY, seed=cfg.seed)
        return load(cfg, folder)
    size = restored_size(Path(cfg.init))
    if size != cfg.size:
        raise InputError(f"init {cfg.init}: weights of the {size} model, not {cfg.size}")
    restore(Path(cfg.init), folder)
    return load(cfg, folder)


def load(cfg: VlmTrainConfig, folder: Path):
    """(model in fp32, its layout at `cfg.input_size`, a PairMaker) for a model folder."""
    import transformers

    from rau_rt.export.vlm.exporter import make_layout

    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, dtype="float32")
    layout = make_layout(model, FAMILY, cfg.input_size, hidden_state=False, aspect_buckets=True)
    maker = PairMaker(layout, (folder / "tokenizer.json").read_text(), cells=cfg.aux_weight > 0,
                      flips=cfg.flips, task=cfg.task)
    return model, layout, maker


def restore(weights: Path, folder: Path) -> Path:
    """The Hugging Face folder of a run's fp16 weights (`WEIGHTS_FILE`): the config and local
    tokenizer of the size they were trained at (their metadata), as the run built them, with
    the weights in fp32.

    Raises:
        InputError: the file is not `rau-rt train vlm` weights, or its tensors do not fit the
            size it names (missing, unexpected or misshapen).
    """
    import torch
    import transformers
    from safetensors.torch import load_file

    from rau_rt.export.vlm.model import build_random

    weights, folder = Path(weights), Path(folder)
    size = restored_size(weights)
    build_random(folder, size, FAMILY)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, dtype="float32")
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(weights).items()}
    mine = model.state_dict()
    wrong = sorted(set(state) ^ set(mine)) + sorted(
        k for k in set(state) & set(mine) if state[k].shape != mine[k].shape)
    if wrong:
        raise InputError(f"{weights}: tensors do not fit the {size} model: {wrong[:5]}")
    with torch.no_grad():
        model.load_state_dict(state)
    model.save_pretrained(folder)
    return folder


def restored_size(weights: Path) -> str:
    """The model size `rau-rt train vlm` weights were trained at (their metadata).

    Raises:
        InputError: no such file, or not weights of `rau-rt train vlm`.
    """
    from safetensors import safe_open

    if not weights.is_file():
        raise InputError(f"{weights}: no such weights file")
    with safe_open(str(weights), "pt") as handle:
        meta = handle.metadata() or {}
    size = meta.get("size")
    if meta.get("model") != "vlm" or size not in SIZES or meta.get("family") != FAMILY:
        raise InputError(f"{weights}: saved for {meta or 'an unknown model'}, not a {FAMILY} "
                         f"VLM of `rau-rt train vlm` (sizes {SIZES})")
    return size


def forward(model, pair: Pair, hidden_states: bool = False):
    """The model's outputs on a pair, with the answer's mean cross-entropy as `.loss`
    (transformers shifts the labels); `hidden_states`: every decoder layer's output too."""
    import torch

    ids = torch.from_numpy(pair.ids)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), **_vision(pair),
                 labels=torch.from_numpy(pair.labels), output_hidden_states=hidden_states)


def pair_loss(model, pair: Pair):
    """Mean cross-entropy of the answer tokens."""
    return forward(model, pair).loss


class AuxHead:
    """The trainer's auxiliary losses: three linear probes with dense targets, two on the
    target image's tokens and one on the answer's box tokens (`vlm_data.occupancy`,
    `segment_boxes`, `box_tokens`). The answer's few box digits tell a from-scratch model
    little; these tell it at every token where each segment is and what its box is. The
    probes are training-only: the model folder and the shipped weights are a plain Qwen2.5-VL.

    - vision: the vision tower's merged tokens predict which segments reach each token's cell
      (binary cross-entropy, occupied cells weighted `AUX_POS_WEIGHT`) and, for each segment
      that does, its box edges' distances from the cell centre (smooth L1, in cells). The
      tower's attention is relative (2-D RoPE), so it can know a box only relative to a cell.
    - text: the decoder's hidden state at the target's image tokens after layer
      `probe_layer` predicts the token's own cell (row, column) and each reaching segment's
      box in the image (smooth L1, in cells). Those absolute positions are what the answer
      writes; the decoder can only learn them from its M-RoPE and causal attention, and here
      it is told to, so that later layers can copy a segment's box from its tokens.
    - answer: the decoder's last hidden state (what the LM head reads) at every answer token
      whose next token writes a requested region's box predicts whether the region is
      visible and, if it is, its box (binary cross-entropy and smooth L1, in cells): it makes
      the answer fetch the box from the image tokens, which the digits' cross-entropy alone
      teaches slowly (the third run's answers were one box for every region).
    """

    def __init__(self, model) -> None:
        import torch

        hidden = model.config.text_config.hidden_size
        count = len(SEGMENTS)
        self.probe_layer = max(1, model.config.text_config.num_hidden_layers // 2)
        self.image_token = int(model.config.image_token_id)
        self.merge = FAMILIES[FAMILY].patch_size * FAMILIES[FAMILY].merge_size
        self.heads = torch.nn.ModuleDict({"vision": torch.nn.Linear(hidden, 5 * count),
                                          "text": torch.nn.Linear(hidden, 2 + 4 * count),
                                          "answer": torch.nn.Linear(hidden, 5)})
        self._merged = None
        model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self._merged = output.pooler_output  # every image's merged tokens, in prompt order

    def loss(self, pair: Pair, outputs) -> tuple[object, dict[str, float]]:
        """The sum of the probes' losses for a pair's forward `outputs` (with hidden states),
        and each term."""
        import torch
        from torch.nn.functional import binary_cross_entropy_with_logits, smooth_l1_loss

        cells = torch.from_numpy(pair.cells)  # [N, S]
        count = cells.shape[1]
        height, width = pair.input_sizes[-1]
        rows, cols = height // self.merge, width // self.merge
        scale = torch.tensor([cols, rows, cols, rows], dtype=torch.float32)
        boxes = torch.from_numpy(pair.boxes) * scale  # [S, 4] in cells, NaN: absent
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        centre = torch.stack([c.flatten(), r.flatten()], 1).float() + 0.5  # [N, 2] x, y
        reach = (cells > 0) & ~torch.isnan(boxes[:, 0])[None]  # [N, S]
        vision = self.heads["vision"](self._merged[-cells.shape[0]:]).view(-1, count, 5)
        occupied = binary_cross_entropy_with_logits(vision[..., 0], cells,
                                                    pos_weight=torch.tensor(AUX_POS_WEIGHT))
        xy = centre[:, None].repeat(1, 1, 2)  # [N, 1, 4]: x, y, x, y
        edges = torch.cat([xy[..., :2] - boxes[None, :, :2], boxes[None, :, 2:] - xy[..., 2:]],
                          -1)  # [N, S, 4] distances left, top, right, bottom
        positions = torch.nonzero(torch.from_numpy(pair.ids[0]) == self.image_token)[:, 0]
        tokens = outputs.hidden_states[self.probe_layer][0, positions[-cells.shape[0]:]]
        text = self.heads["text"](tokens)
        cell = smooth_l1_loss(text[:, :2], centre)
        zero = text.sum() * 0
        relative = smooth_l1_loss(vision[..., 1:][reach], edges[reach]) if reach.any() else zero
        absolute = (smooth_l1_loss(text[:, 2:].view(-1, count, 4)[reach],
                                   boxes[None].expand(len(centre), -1, -1)[reach])
                    if reach.any() else zero)
        terms = {"occupancy": occupied, "relative_box": relative, "cell": cell,
                 "absolute_box": absolute, **self._answer_terms(pair, outputs, scale, zero)}
        return sum(terms.values()), {k: v.item() for k, v in terms.items()}

    def _answer_terms(self, pair: Pair, outputs, scale, zero) -> dict[str, object]:
        """The answer probe's terms: presence and box of the region each box token writes."""
        import torch
        from torch.nn.functional import binary_cross_entropy_with_logits, smooth_l1_loss

        height, width = pair.frame_size
        truth = [pair.truth[n] for n in pair.names]
        start = pair.answer_start
        rows = torch.from_numpy(pair.box_tokens)
        predicted = self.heads["answer"](outputs.hidden_states[-1][0, start + rows[:, 0]])
        visible = torch.tensor([truth[i] is not None for i in pair.box_tokens[:, 1]])
        boxes = torch.tensor([[0.0] * 4 if truth[i] is None else
                              [truth[i][0] / width, truth[i][1] / height, truth[i][2] / width,
                               truth[i][3] / height] for i in pair.box_tokens[:, 1]]) * scale
        presence = binary_cross_entropy_with_logits(predicted[:, 0], visible.float())
        box = smooth_l1_loss(predicted[visible, 1:], boxes[visible]) if visible.any() else zero
        return {"answer_presence": presence, "answer_box": box}


def _vision(pair: Pair) -> dict[str, object]:
    """transformers' image inputs for a pair: its patches, one (1, side, side) grid each."""
    import torch

    patch = FAMILIES[FAMILY].patch_size
    return {"pixel_values": torch.from_numpy(np.concatenate(pair.patches)),
            "image_grid_thw": torch.tensor([[1, h // patch, w // patch]
                                            for h, w in pair.input_sizes])}


def validation_pairs(cfg: VlmTrainConfig, maker: PairMaker) -> list[Pair]:
    """Fixed, unaugmented pairs from VALIDATION_SEEDS."""
    fixed = PairMaker(maker.layout, maker.tokenizer.to_str(), maker.system, augment=False,
                      task=maker.task)
    chosen = []
    for seed in VALIDATION_SEEDS:
        pair = fixed.draw(seed)
        if pair is not None:
            chosen.append(pair)
        if len(chosen) == cfg.validation_pairs:
            break
    return chosen


def evaluate(model, maker: PairMaker, pairs: list[Pair]) -> dict[str, float]:
    """Greedy answers to `pairs` under the localizer's answer grammar (every region asked, in
    order: `constrained.box_grammar`), parsed as the localizer parses them: hit rate (IoU >=
    0.5) and mean IoU over the visible requested segments, presence F1. Then two readings of
    the token that decides between a box and `null` (`decisions`), teacher-forced:
    `forced_presence`, how often it prefers the right one, and `frame_effect`, how much its
    P(box) moves when the target frame is replaced by a black one (0: the answer does not
    read the frame; the fourth and fifth runs read 0.01 or less)."""
    import torch

    from rau_rt.localization.constrained import Guidance, box_grammar
    from rau_rt.localization.parse import parse_answer

    layout = maker.layout
    fam = layout.family_constants
    guidance = Guidance(maker.tokenizer.to_str(), layout.vocab_size, layout.eos_token_ids)
    was_training = model.training
    model.eval()
    ious, tp, fp, fn = [], 0, 0, 0
    with torch.no_grad():
        for pair in pairs:
            start = pair.answer_start
            prompt = torch.from_numpy(pair.ids[:, :start])
            limit = max(pair.input_sizes[-1])  # absolute pixels of the target's input
            grammar = _GrammarMask(guidance.matcher(guidance.compile(box_grammar(pair.names,
                                                                                 limit))),
                                   start, layout.eos_token_ids[0])
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 **_vision(pair), do_sample=False, logits_processor=[grammar],
                                 max_new_tokens=int(pair.answer_tokens * 1.5) + 8)
            text = maker.tokenizer.decode(out[0, start:].tolist(), skip_special_tokens=True)
            got = parse_answer(text, pair.names, fam.box_convention, pair.input_sizes[-1],
                               pair.frame_size)
            for name, truth in pair.truth.items():
                box = got[name].box
                if truth is not None:
                    ious.append(0.0 if box is None else box_iou(box, truth))
                tp += truth is not None and box is not None
                fp += truth is None and box is not None
                fn += truth is not None and box is None
        right, moved = [], []
        for pair in pairs:
            seen = decisions(model, maker, pair)
            dark = image_patches(np.zeros(pair.frame_size, np.uint8), layout, "rgb")
            black = decisions(model, maker, replace(pair, patches=(*pair.patches[:-1], dark)))
            visible = np.array([pair.truth[n] is not None for n in pair.names])
            right += list((seen > 0) == visible)
            moved += list(np.abs(_sigmoid(seen) - _sigmoid(black)))
    model.train(was_training)
    return {"hit_rate": float(np.mean([v >= 0.5 for v in ious])) if ious else float("nan"),
            "mean_iou": float(np.mean(ious)) if ious else float("nan"),
            "presence_f1": 2 * tp / max(1, 2 * tp + fp + fn),
            "forced_presence": float(np.mean(right)), "frame_effect": float(np.mean(moved))}


def decisions(model, maker: PairMaker, pair: Pair) -> np.ndarray:
    """Per requested region, teacher-forced on the pair's answer: the logit of the box's first
    token minus that of `null`'s at the token before the region's value, where the answer
    decides whether the region is visible."""
    box, null = (maker.tokenizer.encode(t, add_special_tokens=False).ids[0] for t in ("[", "null"))
    logits = forward(model, pair).logits[0]
    start = pair.answer_start
    rows = pair.box_tokens[deciding(pair.box_tokens), 0]
    at = logits[start + rows]
    return (at[:, box] - at[:, null]).float().numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class _GrammarMask:
    """A transformers logits processor that keeps greedy decoding inside a `BoxConstraint`
    (the localizer's grammar), then ends the turn once the grammar is complete."""

    def __init__(self, constraint, prompt_length: int, end_id: int) -> None:
        self.constraint, self.prompt_length, self.end_id = constraint, prompt_length, end_id

    def __call__(self, input_ids, scores):
        import torch

        if input_ids.shape[1] > self.prompt_length:  # the token chosen last step
            self.constraint.advance(int(input_ids[0, -1]))
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        if self.constraint.is_stopped():
            allowed[self.end_id] = True
        else:
            mask = torch.from_numpy(self.constraint.allowed())
            allowed[:mask.shape[0]] = mask[:scores.shape[-1]]
        return scores.masked_fill(~allowed, float("-inf"))


def _save_folder(model, folder: Path) -> None:
    """`save_pretrained` into `folder` through a sibling `.partial` folder swapped in, keeping
    the tokenizer files."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    for file in folder.iterdir():
        if not (partial / file.name).exists():
            shutil.copy2(file, partial / file.name)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(partial, folder)
    shutil.rmtree(old)


def train(cfg: VlmTrainConfig, out: Path, *, minutes: float | None = None,
          resume: bool = False, command: str = "",
          progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, object]:
    """Train (or resume) into `out`; returns the record. Stops at `cfg.steps` or after
    `minutes` of this call (a checkpoint is written either way)."""
    import torch

    out = Path(out)
    state_path = state_file(out, resume)
    torch.set_num_threads(cfg.threads)
    folder = out / "model"
    at = Position(0, cfg.first_pair_seed)
    if resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["config"] != asdict(cfg):
            raise InputError(f"--resume: {state_path} was trained with {state['config']}, "
                             f"not {asdict(cfg)}; resume with the same arguments")
        model, _, maker = load(cfg, folder)
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["torch_rng"])
        at = Position(state["step"], state["next_seed"], History(**state["history"]),
                      state["window"])
    else:
        shutil.rmtree(folder, ignore_errors=True)
        model, _, maker = build(cfg, folder)
    aux = AuxHead(model) if cfg.aux_weight > 0 else None
    trainable = torch.nn.ModuleDict({"model": model, **({"aux": aux.heads} if aux else {})})
    if resume and aux is not None:
        aux.heads.load_state_dict(state["aux"])
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    if resume:
        optimizer.load_state_dict(state["optimizer"])

    def step_loss(pair: Pair):
        outputs = forward(model, pair, hidden_states=aux is not None)
        if aux is None:
            return outputs.loss, {}
        dense, terms = aux.loss(pair, outputs)
        return outputs.loss + cfg.aux_weight * dense, {"answer": outputs.loss.item(), **terms}
    model.train()
    pairs = validation_pairs(cfg, maker)
    lineage = init_record(cfg.init)
    history = at.history
    stream = prefetched(maker.stream(at.next_seed), name="vlm-pairs")
    saved: dict[str, object] = {"since": time.monotonic(), "sha256": None}

    def record() -> dict[str, object]:
        base = training_record("vlm", command, asdict(cfg), at.step,
                               (cfg.first_pair_seed, at.next_seed - 1), history.wall_s,
                               history.validation,
                               history.losses[-1] if history.losses else None,
                               seeds_key="pair_seeds")
        return {**base, "init": lineage,
                "weights": {"file": WEIGHTS_FILE, "sha256": saved["sha256"], "dtype": "fp16",
                            "licence": LICENCE, "model_folder": "model"}}

    def checkpoint() -> None:
        history.wall_s += time.monotonic() - saved["since"]
        saved["since"] = time.monotonic()
        save_atomic({"config": asdict(cfg), "model": model.state_dict(),
                     **({"aux": aux.heads.state_dict()} if aux else {}),
                     "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                     "step": at.step, "next_seed": at.next_seed, "history": asdict(history),
                     "window": at.window}, state_path)
        _save_folder(model, folder)
        saved["sha256"] = save_fp16_safetensors(model.state_dict(), out / WEIGHTS_FILE,
                                                {"model": "vlm", "size": cfg.size,
                                                 "family": FAMILY})
        write_json_atomic(out / "record.json", record())
        write_curve(out / "curve.png", history.steps, history.losses, history.validation)

    try:
        run_steps(cfg, at, trainable, optimizer, example=lambda step, seed: next(stream),
                  loss=step_loss,
                  evaluate=lambda: evaluate(model, maker, pairs), checkpoint=checkpoint,
                  minutes=minutes, progress=progress, per_step=cfg.pairs_per_step)
    finally:
        stream.close()
    return record()
