"""Synthetic angiography generation speed (issue target: 64 frames at 512² with truth <= 5 s).

    python -m benchmarks.bench_synthetic [--quick] [--json PATH]

There is no baseline implementation to race, so `baseline` is the issue's budget and `speedup`
is budget / measured median (>= 1 meets it).
"""

from __future__ import annotations

import numpy as np

from benchmarks.harness import case_record, markdown, parse_args, time_interleaved, write_record
from rau_rt.synthetic import generate_sequence

BUDGET_MS = 5000.0  # issue "Synthetic coronary angiography cine generator": <= 5 s


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "benchmarks/results/synthetic_cpu.json")
    repeat = args.repeat or (2 if args.quick else 5)
    seeds = iter(range(10_000))
    times = time_interleaved(
        {"generate": lambda: generate_sequence(seed=next(seeds), frames=64, size=512)},
        warmup=1, repeat=repeat)
    budget = np.full(times["generate"].shape, BUDGET_MS)
    case = case_record("generate_sequence 64 x 512² + truth", "numpy", "uint16",
                       times["generate"], "issue budget (5 s)", budget, {})
    record = write_record("synthetic", [case], args.json, "python -m benchmarks.bench_synthetic")
    print(markdown(record))


if __name__ == "__main__":
    main()
