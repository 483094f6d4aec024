"""Tracking profiles and their levers: speed beside Dice against exact truth, trained weights.

    python -m benchmarks.bench_profiles [--quick] [--json PATH] [--weights W]

The demo's trained SAM2 (`rau_rt/weights/sam2_micro256.safetensors`) exported at micro@256 fp32
tracks the accuracy benchmark's held-out cines (benchmarks.bench_accuracy: 3-4 regions per
cine, in its three regimes: a mask on the first frame, a jittered box every 15 frames, another
patient's annotated reference) once per setting of the memory levers
(`TrackerConfig.recent_memories` / `recent_pointers` / `memory_interval` / `memory_pool` /
`memory_window`, the profiles `exact` and `fast`, and combinations with pooling and windows),
and sam2's video predictor tracks them once as the baseline. Per setting: Dice (segments >= 2
mm) per regime and its mean, the change against `exact`, and median ms per frame (all regions,
the first two frames excluded); speedup = predictor median / ours. The record names the memory
pooling the weights were trained with (`weights_memory_pool`; settings with another pool run
mismatched, as the tracker warns). Settings take turns cine by cine, so the shared machine's
load falls on all of them alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from benchmarks.bench_accuracy import (
    HELD_OUT,
    REGIMES,
    Sam2Weights,
    export_bundle,
    predictor_run,
    prepare,
    score,
    tracker_run,
)
from benchmarks.harness import run_suite, stats
from rau_rt.bundle import load_bundle
from rau_rt.config import EngineConfig
from rau_rt.sam2_layout import read_layout
from rau_rt.synthetic.scoring import Scorecard
from rau_rt.tracking import TrackerConfig
from rau_rt.tracking.tracker import LEVERS

SUITE = "profiles"
BASELINE = "sam2-predictor"
# name -> tracker settings: the two profiles and one lever at a time around `exact` ("fast"
# is memories-2 with interval-2 and window-3)
SETTINGS = {
    "exact": TrackerConfig(),
    "memories-4": TrackerConfig(recent_memories=4),
    "memories-2": TrackerConfig(recent_memories=2),
    "memories-1": TrackerConfig(recent_memories=1),
    "memories-0": TrackerConfig(recent_memories=0),
    "pointers-4": TrackerConfig(recent_pointers=4),
    "pointers-0": TrackerConfig(recent_pointers=0),
    "interval-2": TrackerConfig(memory_interval=2),
    "interval-3": TrackerConfig(memory_interval=3),
    "pool-2": TrackerConfig(memory_pool=2),
    "window-3": TrackerConfig(memory_window=3),
    "window-6": TrackerConfig(memory_window=6),
    "fast": TrackerConfig(profile="fast"),
    "fast+window-0": TrackerConfig(profile="fast", memory_window=0),
    "fast+pool-2+window-0": TrackerConfig(profile="fast", memory_pool=2, memory_window=0),
}


def collect(args, workdir: Path) -> tuple[list, dict]:
    weights = Sam2Weights.of(Path(args.weights), args.config)
    cines, frames = (HELD_OUT[:2], 40) if args.quick else (HELD_OUT, 60)
    export_bundle(weights, workdir / "all", gate=False)
    bundle = load_bundle(workdir / "all", config=EngineConfig(precision="fp32",
                                                               spin_wait=False))
    trained_pool = read_layout(workdir / "all").memory_pool  # others run mismatched
    predictor = weights.predictor()
    prepared = [prepare(c, frames, workdir) for c in cines]
    names = [*SETTINGS, BASELINE]
    cards = {(n, r): Scorecard() for n in names for r in REGIMES}
    times: dict[str, list[float]] = {n: [] for n in names}
    windowed = dict.fromkeys(SETTINGS, 0)  # region-frames that ran windowed
    region_frames = 0  # per setting: every region on every frame
    for p in prepared:
        for regime in REGIMES:
            masks, ms = predictor_run(predictor, p, regime, workdir)
            score(p, masks, cards[BASELINE, regime])
            times[BASELINE].extend(ms[2:])
            for name, config in SETTINGS.items():
                masks, ms, ran_windowed = tracker_run(bundle, p, regime, config=config)
                score(p, masks, cards[name, regime])
                times[name].extend(ms[2:])
                windowed[name] += sum(ran_windowed)
            region_frames += len(p.regions) * len(ms)
    bundle.close()
    base = stats(np.asarray(times[BASELINE]))
    dice = {n: {r: cards[n, r].summary()["dice_ge2mm"] for r in REGIMES} for n in names}
    exact_mean = float(np.mean(list(dice["exact"].values())))
    cases = []
    for name in names:
        mine = stats(np.asarray(times[name]))
        mean = float(np.mean(list(dice[name].values())))
        config = SETTINGS.get(name)
        cases.append({
            "case": f"{'tracker' if config else 'predictor'}/{weights.label}/fp32/{name}",
            "backend": "onnxruntime-cpu" if config else "torch-cpu", "precision": "fp32",
            "levers": None if config is None else dict(zip(LEVERS, config.levers,
                                                           strict=True)),
            "windowed_fraction": None if config is None else windowed[name] / region_frames,
            **mine, "baseline": BASELINE, "baseline_median_ms": base["median_ms"],
            "baseline_p90_ms": base["p90_ms"], "speedup": base["median_ms"] / mine["median_ms"],
            "task": {"dice_ge2mm": dice[name], "dice_ge2mm_mean": mean,
                     "dice_change_vs_exact": mean - exact_mean},
            "fidelity": {}})
    facts = {"weights": str(weights), "weights_memory_pool": trained_pool, "frames": frames,
             "cines": [c.__dict__ | {"regions": p.regions} for c, p in zip(cines, prepared,
                                                                            strict=True)],
             "summary_md": table(cases)}
    return cases, facts


def table(cases: list[dict]) -> str:
    lines = ["| setting | memories / pointers / interval / pool / window | windowed | Dice mask "
             "/ box / reference | mean (vs exact) | ms/frame | vs predictor |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        d = c["task"]["dice_ge2mm"]
        levers = "sam2" if c["levers"] is None else " / ".join(
            str(v) for v in c["levers"].values())
        share = c.get("windowed_fraction")  # absent in records before it was counted
        lines.append(f"| {c['case'].rsplit('/', 1)[1]} | {levers} | "
                     + ("-" if share is None else f"{share:.0%}") + " | "
                     + " / ".join(f"{d[r]:.3f}" for r in REGIMES)
                     + f" | {c['task']['dice_ge2mm_mean']:.3f} "
                     f"({c['task']['dice_change_vs_exact']:+.3f}) | {c['median_ms']:.1f} | "
                     f"{c['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def extra(parser) -> None:
        Sam2Weights.add_arguments(parser)

    return run_suite("bench_profiles", __doc__, "benchmarks/results/profiles_cpu.json",
                     collect, argv=argv, suite=SUITE, extra_args=extra)


if __name__ == "__main__":
    sys.exit(main())
