"""Synthetic angiography generation speed (issue target: 64 frames at 512² with truth <= 5 s).

    python -m benchmarks.bench_synthetic [--quick] [--json PATH]

There is no baseline implementation to race, so `baseline` is the issue's budget and `speedup`
is budget / measured median (>= 1 meets it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.harness import case_record, run_suite, time_interleaved
from rau_rt.synthetic import generate_sequence

BUDGET_MS = 5000.0  # issue "Synthetic coronary angiography cine generator": <= 5 s


def collect(args, workdir: Path) -> list:
    seeds = iter(range(10_000))
    times = time_interleaved(
        {"generate": lambda: generate_sequence(seed=next(seeds), frames=64, size=512)},
        warmup=1, repeat=args.repeat or (2 if args.quick else 5))
    budget = np.full(times["generate"].shape, BUDGET_MS)
    return [case_record("generate_sequence 64 x 512² + truth", "numpy", "uint16",
                        times["generate"], "issue budget (5 s)", budget, {})]


def main(argv: list[str] | None = None) -> int:
    return run_suite("bench_synthetic", __doc__, "benchmarks/results/synthetic_cpu.json",
                     collect, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
