"""Benchmark suites, run from the repository root as `python -m benchmarks.<suite>` (not installed).

Each suite writes one JSON record `{"suite", "device", "versions", "cases": [...]}` (STYLE.md,
Benchmarks); the latest full-size results live in `benchmarks/results/`.
"""
