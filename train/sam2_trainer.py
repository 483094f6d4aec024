"""`rau-rt train sam2`: the training loop, resumable checkpoints, validation and the record.

One clip per step (its 1-4 regions are the batch, as the tracker batches them), AdamW with a
linear warm-up and a cosine decay over all steps, gradients clipped at norm 1. A curriculum of
stages grows the clips: from scratch, the all-background answer is a deep basin for thin
vessels (0.2 % of a frame), and single box-prompted frames (0.2 s a step) are where the model
first learns to find the segment in its box; longer clips then teach memory, presence and the
reference. The clip stream is a pure function of the step's generator seed, and the checkpoint
holds the model, the optimizer, the next seed and torch's RNG state, so a run stopped by
`--minutes` and resumed with `--resume` continues the same run.

Files in `--out`:
    train_state.pt  the resumable state (written atomically every `checkpoint_minutes`)
    sam2.pt         sam2's `{"model": state_dict}` of the latest checkpoint (and the
                    run's "memory_pool", which sam2 ignores)
    sam2.fp16.safetensors  the same weights in fp16, as the repository ships them
                    (rau_rt/weights/, with record.json beside them)
    record.json     command, seeds, steps, wall time, losses, validation Dice, versions, commit
    curve.png       loss and validation Dice over steps
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rau_rt.errors import InputError
from rau_rt.sam2_layout import MEMORY_POOL
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
from rau_rt.train.sam2_data import REGIME_WEIGHTS, REGIMES, ClipSpec, clip_stream, draw_clip

CONFIGS = ("micro", "mini", "tiny")  # 2.6 M, 3.7 M (micro's wider trunk); sam2.1 hiera-t, 39 M
WEIGHTS_FILE = "sam2.fp16.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (recorded in record.json)."""

    config: str = "micro"
    image_size: int = 256
    stages: tuple[tuple[int, int], ...] = ((6000, 1), (2000, 3), (1500, 8))  # (steps, frames)
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup: int = 200
    grad_clip: float = 1.0
    seed: int = 0  # model init and torch's RNG
    first_clip_seed: int = TRAIN_SEEDS.start
    checkpoint_minutes: float = 5.0
    validate_every: int = 500
    validation_clips: int = 8  # per regime
    threads: int = 2
    regime_weights: tuple[float, float, float] = REGIME_WEIGHTS  # box, mask, reference
    init: str | None = None  # weights to start from (sam2 .pt or .safetensors); None: random
    init_partial: bool = False  # copy only init's tensors that fit (another config's weights)
    memory_pool: int = 1  # 1: sam2's memory attention; MEMORY_POOL: trained pooled (`pool_memory`)

    def __post_init__(self) -> None:
        if self.config not in CONFIGS:
            raise InputError(f"config {self.config!r}: expected one of {CONFIGS}")
        if self.image_size not in (256, 512):
            raise InputError(f"image_size {self.image_size}: expected 256 or 512")
        if self.config == "tiny" and self.image_size == 256:
            raise InputError("image_size 256 is for the micro and mini configs; tiny trains at "
                             "512")
        if not self.stages or any(n < 1 or f < 1 for n, f in self.stages) \
                or self.validate_every < 1:
            raise InputError("stages of (steps >= 1, frames >= 1) and validate_every >= 1 "
                             f"expected, got {self.stages}, {self.validate_every}")
        weights = self.regime_weights
        if len(weights) != len(REGIMES) or min(weights) < 0 or sum(weights) <= 0 \
                or (any(f == 1 for _, f in self.stages) and weights[0] + weights[2] <= 0):
            raise InputError(f"regime_weights {weights}: expected {len(REGIMES)} weights >= 0 "
                             f"for {', '.join(REGIMES)}, not all zero (and not only mask "
                             "when a stage has one-frame clips: a mask clip needs 2 frames)")
        if self.init is not None and not Path(self.init).is_file():
            raise InputError(f"init {self.init}: no such file")
        if self.init_partial and self.init is None:
            raise InputError("init_partial copies the fitting tensors of init: give init too")
        if self.memory_pool not in (1, MEMORY_POOL):
            raise InputError(f"memory_pool {self.memory_pool}: expected 1 (sam2's memory "
                             f"attention) or {MEMORY_POOL} (the tracker's pooled memory)")
        if self.first_clip_seed not in TRAIN_SEEDS:
            raise InputError(f"first_clip_seed {self.first_clip_seed}: training seeds are "
                             f"{TRAIN_SEEDS.start}..{TRAIN_SEEDS.stop - 1} (disjoint from the "
                             "validation and held-out seeds)")


    @property
    def steps(self) -> int:
        return sum(n for n, _ in self.stages)

    @property
    def frames(self) -> int:
        """The last stage's clip length (validation clips have it)."""
        return self.stages[-1][1]

    def frames_at(self, step: int) -> int:
        """Clip length of step `step` (0-based)."""
        for n, frames in self.stages:
            if step < n:
                return frames
            step -= n
        return self.stages[-1][1]


def parse_stages(text: str) -> tuple[tuple[int, int], ...]:
    """"6000x1,2000x3,1500x8" -> ((6000, 1), (2000, 3), (1500, 8))."""
    try:
        stages = tuple(tuple(int(v) for v in part.split("x")) for part in text.split(","))
    except ValueError:
        stages = ()
    if not stages or any(len(s) != 2 for s in stages):
        raise InputError(f"stages {text!r}: expected STEPSxFRAMES[,STEPSxFRAMES...], e.g. "
                         "6000x1,2000x3,1500x8")
    return stages


def new_model(cfg: TrainConfig) -> tuple[object, list[str]]:
    """The plain sam2 model of `cfg.config` at `cfg.image_size`: randomly initialised, or
    holding the weights of `cfg.init` (a fine-tune of an earlier run), or with
    `cfg.init_partial` the tensors of `cfg.init` that fit (a larger config grown from a smaller
    one's weights). Returns it with the names of the tensors a partial init left random."""
    import torch

    from rau_rt.export.sam2.model import build, load_checkpoint, warm_start

    torch.manual_seed(cfg.seed)
    if cfg.init is not None and not cfg.init_partial:
        model, fresh = load_checkpoint(cfg.init, cfg.config, cfg.image_size).float(), []
    else:
        model = build(cfg.config, cfg.image_size)
        fresh = warm_start(model, cfg.init) if cfg.init is not None else []
    pool_memory(model, cfg.memory_pool)
    return model, fresh


def pool_memory(model, pool: int) -> None:
    """Make `model`'s memory attention attend pooled memory tokens, as the tracker's
    `memory_pool` lever runs it (the bundle's `memory_attention_pooled` graph), so a fine-tune
    learns the keys that graph gives it; EdgeTAM trains its memory compressor likewise.

    Each layer's cross-attention gets the forward of `RealRoPEAttention(pool=pool)` over its
    own projections: the parameters and the state dict stay sam2's, so the weights export and
    load unchanged, and the pooled graph computes what was trained. Unlike sam2's
    cross-attention, the pooled one drops no attention weights in training (sam2: 0.1).
    `pool` 1 leaves the model alone.
    """
    from rau_rt.export.sam2.model import RealRoPEAttention, feature_side

    if pool == 1:
        return
    side = feature_side(model)
    for layer in model.memory_attention.layers:
        attention = layer.cross_attn_image
        # An instance attribute: nn.Module.__call__ finds it before the class's forward, and
        # sam2's layer still sees a RoPEAttention (it passes the pointer count by that type).
        attention.forward = RealRoPEAttention(attention, side, pool).forward


def clip_loss(model, clip) -> tuple[object, dict[str, float]]:
    """Mean loss over a clip's supervised frames and regions, and its terms as floats."""
    import torch

    from rau_rt.train.sam2_clip import run_clip
    from rau_rt.train.sam2_loss import frame_loss, total

    outputs = run_clip(model, clip)
    targets = torch.from_numpy(clip.targets)
    sums: dict[str, object] = {}
    for t, out in enumerate(outputs):
        if not clip.supervised[t]:
            continue
        for name, value in frame_loss(out.multimasks, out.ious, out.object_scores,
                                      targets[t]).items():
            sums[name] = sums.get(name, 0) + value
    count = int(clip.supervised.sum()) * clip.targets.shape[1]
    terms = {name: value / count for name, value in sums.items()}
    return total(terms), {name: float(value.detach()) for name, value in terms.items()}


def validation_clips(cfg: TrainConfig) -> dict[str, list]:
    """Fixed, unaugmented clips per regime from VALIDATION_SEEDS, as long as the last stage's
    (at least 2 frames: a mask clip tracks after its masked frame)."""
    spec = ClipSpec(cfg.image_size, max(2, cfg.frames), augment=False)
    clips: dict[str, list] = {}
    for regime in REGIMES:
        chosen = []
        for seed in VALIDATION_SEEDS:
            clip = draw_clip(seed, spec, regime)
            if clip is not None:
                chosen.append(clip)
            if len(chosen) == cfg.validation_clips:
                break
        clips[regime] = chosen
    return clips


def evaluate(model, clips: dict[str, list]) -> dict[str, float]:
    """Mean Dice of present targets and presence accuracy per regime, at the input size."""
    import torch

    from rau_rt.train.sam2_clip import run_clip

    was_training = model.training
    model.eval()
    result: dict[str, float] = {}
    with torch.no_grad():
        for regime, chosen in clips.items():
            dices, presence = [], []
            for clip in chosen:
                for t, out in enumerate(run_clip(model, clip)):
                    if not clip.supervised[t]:
                        continue
                    pred = (out.masks[:, 0] > 0).numpy()
                    for mask, truth in zip(pred, clip.targets[t], strict=True):
                        presence.append(bool(mask.any()) == bool(truth.any()))
                        if truth.any():
                            inter = np.logical_and(mask, truth).sum()
                            dices.append(2 * inter / (mask.sum() + truth.sum()))
            result[f"dice_{regime}"] = float(np.mean(dices)) if dices else float("nan")
            result[f"presence_{regime}"] = float(np.mean(presence)) if presence else float("nan")
    model.train(was_training)
    return result


def train(cfg: TrainConfig, out: Path, *, minutes: float | None = None, resume: bool = False,
          command: str = "", progress: Callable[[int, dict[str, float]], None] | None = None,
          ) -> dict[str, object]:
    """Train (or resume) into `out`; returns the record. Stops at `cfg.steps` or after
    `minutes` of this call (a checkpoint is written either way)."""
    import torch

    out = Path(out)
    state_path = state_file(out, resume)
    torch.set_num_threads(cfg.threads)
    model, fresh = new_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    at = Position(0, cfg.first_clip_seed)
    if resume:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        saved = asdict(TrainConfig()) | state["config"]  # runs from before a field existed
        if saved != asdict(cfg):
            raise InputError(f"--resume: {state_path} was trained with {state['config']}, "
                             f"not {asdict(cfg)}; resume with the same arguments")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        at = Position(state["step"], state["next_seed"], History(**state["history"]),
                      state["window"])
    model.train()
    clips = validation_clips(cfg)
    lineage = init_record(cfg.init, fresh)
    history = at.history
    saved = {"since": time.monotonic(), "sha256": None}  # the clock and the last weights
    streams: dict[int, object] = {}  # clip length -> its stream (one per curriculum stage)

    def end_streams() -> None:  # stops the thread drawing ahead
        for stream in streams.values():
            stream.close()
        streams.clear()

    def example(step: int, next_seed: int):
        frames = cfg.frames_at(step)
        if frames not in streams:  # the next stage of the curriculum (or a resumed one)
            end_streams()
            streams[frames] = prefetched(clip_stream(next_seed, ClipSpec(
                cfg.image_size, frames, regime_weights=cfg.regime_weights)), name="sam2-clips")
        return next(streams[frames])

    def record() -> dict[str, object]:
        return {**training_record("sam2", command, asdict(cfg), at.step,
                                  (cfg.first_clip_seed, at.next_seed - 1),
                                  history.wall_s, history.validation,
                                  history.losses[-1] if history.losses else None),
                "init": lineage,
                "weights": {"file": WEIGHTS_FILE, "sha256": saved["sha256"], "dtype": "fp16",
                            "licence": LICENCE}}

    def checkpoint() -> None:
        history.wall_s += time.monotonic() - saved["since"]
        saved["since"] = time.monotonic()
        save_atomic({"config": asdict(cfg), "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                     "step": at.step, "next_seed": at.next_seed, "history": asdict(history),
                     "window": at.window},
                    state_path)
        save_atomic({"model": model.state_dict(), "memory_pool": cfg.memory_pool},
                    out / "sam2.pt")
        saved["sha256"] = save_fp16_safetensors(
            model.state_dict(), out / WEIGHTS_FILE,
            {"model": "sam2", "config": cfg.config, "image_size": str(cfg.image_size),
             "memory_pool": str(cfg.memory_pool)})
        write_json_atomic(out / "record.json", record())
        write_curve(out / "curve.png", history.steps, history.losses, history.validation)

    try:
        run_steps(cfg, at, model, optimizer, example=example,
                  loss=lambda clip: clip_loss(model, clip),
                  evaluate=lambda: evaluate(model, clips), checkpoint=checkpoint,
                  minutes=minutes, progress=progress)
    finally:
        end_streams()
    return record()
