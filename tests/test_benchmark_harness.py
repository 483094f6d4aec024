"""benchmarks.harness: a record names the command that reproduces it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.harness import reproduce_command, run_suite

CASE = {"case": "a", "backend": "onnxruntime-cpu", "precision": "fp32", "median_ms": 2.0,
        "p90_ms": 2.5, "baseline": "b", "baseline_median_ms": 4.0, "baseline_p90_ms": 5.0,
        "speedup": 2.0}


def _extra(parser) -> None:
    parser.add_argument("--weights", type=Path, default=Path("shipped.safetensors"))
    parser.add_argument("--memory-only", action="store_true")


def _command(tmp_path: Path, *argv: str) -> str:
    out = tmp_path / "record.json"
    run_suite("bench_x", "x", str(out), lambda args, workdir: [CASE],
              argv=[*argv, "--json", str(out)], extra_args=_extra)
    return json.loads(out.read_text())["command"]


def test_the_recorded_command_has_every_flag_that_changed_the_run(tmp_path, capsys):
    assert _command(tmp_path) == "python -m benchmarks.bench_x"
    assert _command(tmp_path, "--quick", "--weights", "runs/pooled.safetensors",
                    "--memory-only") == ("python -m benchmarks.bench_x --quick --weights "
                                         "runs/pooled.safetensors --memory-only")
    # a value given but equal to the default changes nothing
    assert _command(tmp_path, "--weights", "shipped.safetensors") == \
        "python -m benchmarks.bench_x"
    assert "Reproduce: `python -m benchmarks.bench_x`" in capsys.readouterr().out


def test_a_hand_parsed_benchmark_records_its_changed_values_the_same_way():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(["--frames", "6", "--device", "cpu", "--json", "out.json"])
    assert reproduce_command("bench_y", args, parser.parse_args([])) == \
        "python -m benchmarks.bench_y --frames 6"
