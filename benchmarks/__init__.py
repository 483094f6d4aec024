"""Benchmark suites: `python -m benchmarks.<suite> [--quick] [--json PATH]` (not installed)."""
