"""`rau-rt train sam2|vlm`: train the demo models on synthetic angiography (see rau_rt.train).

The shipped demo SAM2 comes from `rau-rt train sam2 --out DIR` (README, "Demo models"); `rau-rt
train vlm --out DIR` trains the demo localizer. Runs are resumable (`--minutes` stops one with a
checkpoint, `--resume` continues it).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    from rau_rt.train.sam2_trainer import CONFIGS, TrainConfig

    defaults = TrainConfig()
    sub = parser.add_subparsers(dest="model", metavar="MODEL", required=True)
    sam2 = sub.add_parser("sam2", help="the demo SAM2 (box, mask and reference-memory "
                          "tracking on synthetic cines)")
    sam2.add_argument("--out", type=Path, required=True,
                      help="run folder: train_state.pt, sam2.pt, record.json, curve.png")
    sam2.add_argument("--config", choices=CONFIGS, default=defaults.config)
    sam2.add_argument("--image-size", type=int, choices=(256, 512), default=defaults.image_size)
    stages = ",".join(f"{n}x{f}" for n, f in defaults.stages)
    sam2.add_argument("--stages", default=stages,
                      help=f"curriculum: STEPSxFRAMES per stage (one clip of 1-4 regions per "
                           f"step); the learning-rate schedule spans all (default {stages})")
    sam2.add_argument("--lr", type=float, default=defaults.lr)
    sam2.add_argument("--seed", type=int, default=defaults.seed, help="model init seed")
    sam2.add_argument("--init", default=None, metavar="WEIGHTS",
                      help="start from these weights (a run's sam2.pt or .safetensors, e.g. the "
                           "shipped ones) instead of random ones; the record keeps their record")
    sam2.add_argument("--init-partial", action="store_true",
                      help="copy only the tensors of --init that fit --config and start the rest "
                           "random: a larger config grown from a smaller one's weights (the "
                           "record names the modules that started random)")
    sam2.add_argument("--first-clip-seed", type=int, default=defaults.first_clip_seed,
                      help="generator seed of the first training clip (a fine-tune draws new "
                           f"clips from a later one; default {defaults.first_clip_seed})")
    weights = ",".join(f"{w:g}" for w in defaults.regime_weights)
    sam2.add_argument("--regime-weights", default=weights, metavar="BOX,MASK,REFERENCE",
                      help=f"how often each prompt regime is drawn (default {weights})")
    sam2.add_argument("--memory-pool", type=int, choices=(1, 2), default=defaults.memory_pool,
                      help="2: memory attention attends each memory's tokens pooled 2x2, as "
                           "the tracker's memory_pool=2 runs it, so the weights learn it "
                           "(default 1: sam2's memory attention)")
    sam2.add_argument("--validate-every", type=int, default=defaults.validate_every)
    sam2.add_argument("--minutes", type=float, default=None,
                      help="stop after this long (checkpointed; continue with --resume)")
    sam2.add_argument("--resume", action="store_true",
                      help="continue the run in --out with the same arguments")
    sam2.add_argument("--quiet", action="store_true", help="no progress bar")

    from rau_rt.train.vlm_data import TASKS
    from rau_rt.train.vlm_trainer import VlmTrainConfig

    vlm_defaults = VlmTrainConfig()
    vlm = sub.add_parser("vlm", help="the demo localizer (a micro Qwen2.5-VL answering the "
                         "localizer's prompt on synthetic reference/target pairs)")
    vlm.add_argument("--out", type=Path, required=True,
                     help="run folder: train_state.pt, model/ (a Hugging Face folder for "
                          "`rau-rt export vlm --model`), record.json, curve.png")
    vlm.add_argument("--input-size", type=int, default=vlm_defaults.input_size,
                     help=f"square vision input, a multiple of 28 (default "
                          f"{vlm_defaults.input_size})")
    vlm.add_argument("--steps", type=int, default=vlm_defaults.steps,
                     help=f"optimizer steps (default {vlm_defaults.steps})")
    vlm.add_argument("--pairs-per-step", type=int, default=vlm_defaults.pairs_per_step,
                     help="pairs whose gradients each step averages (default "
                          f"{vlm_defaults.pairs_per_step})")
    vlm.add_argument("--lr", type=float, default=vlm_defaults.lr)
    vlm.add_argument("--task", choices=TASKS, default=vlm_defaults.task,
                     help="locate: the localizer's query (default); ground: its pretext, one "
                          "named region in the target alone, no reference; read: the same "
                          "with that region drawn on the target")
    vlm.add_argument("--aux-weight", type=float, default=vlm_defaults.aux_weight,
                     help="weight of the training-only probes' dense losses (0: off; default "
                          f"{vlm_defaults.aux_weight})")
    vlm.add_argument("--seed", type=int, default=vlm_defaults.seed, help="model init seed")
    vlm.add_argument("--init", default=None, metavar="WEIGHTS",
                     help="start from a run's vlm.fp16.safetensors (e.g. a pretext run's) "
                          "instead of random initialisation")
    vlm.add_argument("--validate-every", type=int, default=vlm_defaults.validate_every)
    vlm.add_argument("--minutes", type=float, default=None,
                     help="stop after this long (checkpointed; continue with --resume)")
    vlm.add_argument("--resume", action="store_true",
                     help="continue the run in --out with the same arguments")
    vlm.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from rau_rt.errors import InputError

    if args.model == "vlm":
        from rau_rt.train.vlm_trainer import VlmTrainConfig, train

        cfg = VlmTrainConfig(input_size=args.input_size, steps=args.steps, lr=args.lr,
                             seed=args.seed, validate_every=args.validate_every,
                             task=args.task, init=args.init,
                             pairs_per_step=args.pairs_per_step, aux_weight=args.aux_weight)
        return _train(args, cfg, train, "pair" if cfg.pairs_per_step == 1 else "step",
                      lambda values: {k: v for k, v in values.items()
                                      if k in ("loss", "answer", "hit_rate", "presence_f1")})
    from rau_rt.train.sam2_trainer import TrainConfig, parse_stages, train

    try:
        weights = tuple(float(w) for w in args.regime_weights.split(","))
    except ValueError:
        raise InputError(f"--regime-weights {args.regime_weights!r}: expected three numbers "
                         "BOX,MASK,REFERENCE, e.g. 0.45,0.25,0.3") from None
    cfg = TrainConfig(config=args.config, image_size=args.image_size,
                      stages=parse_stages(args.stages), lr=args.lr, seed=args.seed,
                      validate_every=args.validate_every, regime_weights=weights,
                      init=args.init, init_partial=args.init_partial,
                      first_clip_seed=args.first_clip_seed, memory_pool=args.memory_pool)
    return _train(args, cfg, train, "clip",
                  lambda values: {"loss": values["loss"],
                                  **{k.removeprefix("dice_"): v for k, v in values.items()
                                     if k.startswith("dice_")}})


def _train(args: argparse.Namespace, cfg, train, unit: str,
           shown: Callable[[dict[str, float]], dict[str, float]]) -> int:
    """Run `train(cfg, ...)` under a progress bar showing `shown(values)`; Ctrl-C ends it
    checkpointed (exit 130); prints where the run stands."""
    from tqdm import tqdm

    command = shlex.join(["rau-rt", *args.argv])
    with tqdm(total=cfg.steps, desc=f"train {args.model}", unit=unit,
              disable=args.quiet) as bar:

        def progress(step: int, values: dict[str, float]) -> None:
            bar.n = step
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown(values).items()}, refresh=False)
            bar.update(0)

        try:
            record = train(cfg, args.out, minutes=args.minutes, resume=args.resume,
                           command=command, progress=progress)
        except KeyboardInterrupt:
            bar.close()
            print(f"{args.out}: interrupted at step {bar.n}, checkpointed; continue with "
                  "--resume")
            return 130
    done = record["steps_done"]
    last = record["validation"][-1] if record["validation"] else {}
    print(f"{args.out}: {done}/{cfg.steps} steps in {record['wall_s'] / 60:.1f} min; "
          + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "step")
          + ("" if done == cfg.steps else "; continue with --resume"))
    return 0
