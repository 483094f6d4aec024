"""The one benchmark harness: interleaved timed loops, percentiles, and the JSON record.

Record shape (STYLE.md, Benchmarks): {"suite", "device", "versions", "cases": [{"case",
"backend", "precision", "median_ms", "p90_ms", "baseline", "baseline_median_ms", "speedup",
"fidelity"}]}, where speedup = baseline median / our median from the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rau_rt import ops
from rau_rt._version import __version__
from rau_rt.profiling import cpu_model, latency_stats, package_version, peak_rss_mib


def parse_args(description: str, default_json: str, argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None,
               ) -> argparse.Namespace:
    """--quick, --json, --repeat, and whatever `extra` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions (about a minute on 2 cores)")
    parser.add_argument("--json", default=default_json, help="where to write the JSON record")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions per case")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def run_suite(module: str, doc: str, default_json: str,
              collect: Callable[[argparse.Namespace, Path], list | tuple[list, dict]], *,
              argv: list[str] | None = None, suite: str | None = None,
              extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
              device_extra: Callable[[], dict[str, object]] | None = None) -> int:
    """A benchmark's `main`: parse the common flags (plus `extra_args`), run `collect(args,
    workdir)` in a temporary folder, write the record and print its README table.

    `collect` returns the cases, or (cases, facts) with facts added to the record's top level.
    The recorded command is `python -m benchmarks.<module>` with every flag that differs from
    its default (`--json` aside).
    """
    import tempfile

    args = parse_args(doc.splitlines()[0], default_json, argv, extra_args)
    with tempfile.TemporaryDirectory(prefix=f"{module}_") as workdir:
        collected = collect(args, Path(workdir))
    cases, facts = collected if isinstance(collected, tuple) else (collected, {})
    command = reproduce_command(module, args, parse_args("", default_json, [], extra_args))
    record = write_record(suite or module.removeprefix("bench_"), cases, args.json, command,
                          **(device_extra() if device_extra else {}))
    if facts:
        record.update(facts)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    return 0


def reproduce_command(module: str, args: argparse.Namespace,
                      defaults: argparse.Namespace) -> str:
    """`python -m benchmarks.<module>` with every flag whose value differs from its default
    (`--json` aside: where the record goes does not change it)."""
    flags = []
    for key, value in vars(args).items():
        if key == "json" or value == getattr(defaults, key):
            continue
        flag = f"--{key.replace('_', '-')}"
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join([f"python -m benchmarks.{module}", *flags])


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeat: int,
    turn: int = 1,
    settle: int = 0,
) -> dict[str, np.ndarray]:
    """Milliseconds per call for each entry, measured in turns, round-robin in rotating order.

    Interleaving makes every implementation see the same background load on a shared machine,
    so ratios from one run hold even when absolute times drift. Each turn is `settle` untimed
    calls then `turn` timed ones: a runtime whose pool threads keep spinning after a call
    (ONNX Runtime) would otherwise slow whichever entry runs next. CPU calls return when their
    outputs are ready, so no device sync is needed here.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(-(-repeat // turn)):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            for _ in range(settle):
                calls[name]()
            for _ in range(turn):
                start = time.perf_counter()
                calls[name]()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: np.asarray(values[:repeat]) for name, values in samples.items()}


def stats(samples_ms: np.ndarray) -> dict[str, float]:
    """Percentiles, mean, std and tail (max - p95) of one entry's samples: the runtime's
    `latency_stats`, under the record's key names."""
    s = latency_stats(samples_ms)
    return {"median_ms": s["p50"], "p90_ms": s["p90"], "p99_ms": s["p99"],
            "mean_ms": s["mean"], "std_ms": s["std"], "tail_ms": s["tail"], "runs": s["count"]}


def case_record(case: str, backend: str, precision: str, ours: np.ndarray, baseline: str,
                theirs: np.ndarray, fidelity: dict[str, float]) -> dict[str, object]:
    mine, base = stats(ours), stats(theirs)
    return {
        "case": case, "backend": backend, "precision": precision,
        **mine,
        "baseline": baseline, "baseline_median_ms": base["median_ms"],
        "baseline_p90_ms": base["p90_ms"],
        "speedup": base["median_ms"] / mine["median_ms"],
        "fidelity": fidelity,
    }


def environment(**device_extra: object) -> dict[str, object]:
    """Device and versions, for the record's `device` and `versions` keys."""
    import cv2

    device = {"cpu": cpu_model(), "machine": platform.machine(),
              "physical_cores": ops.physical_cores(),
              "native_threads": ops.num_threads(), "opencv_threads": cv2.getNumThreads(),
              "gpu": None, **device_extra}
    versions = {"rau_rt": __version__, "python": platform.python_version(),
                "native": ops.native_info()["built"]}
    for dist in ("numpy", "opencv-python-headless", "onnxruntime", "onnx", "torch"):
        if (version := package_version(dist)) is not None:
            versions[dist] = version
    return {"device": device, "versions": versions}


def write_record(suite: str, cases: list[dict[str, object]], path: str, command: str,
                 **device_extra: object) -> dict[str, object]:
    """Write the suite's JSON record (with environment and peak RSS) and return it."""
    record = {"suite": suite, **environment(**device_extra), "cases": cases,
              "peak_rss_mib": peak_rss_mib(),
              "command": command}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def markdown(record: dict[str, object]) -> str:
    """README table rows for a record, with the command that reproduces them."""
    device = record["device"]
    lines = [
        "| case | ours | median ms (p90) | baseline | median ms (p90) | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for c in record["cases"]:
        lines.append(
            f"| {c['case']} | {c['backend']} {c['precision']} | {c['median_ms']:.2f} "
            f"({c['p90_ms']:.2f}) | {c['baseline']} | {c['baseline_median_ms']:.2f} "
            f"({c['baseline_p90_ms']:.2f}) | {c['speedup']:.2f}x |")
    threads = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in device.items()
                        if k.endswith("threads"))
    where = f"{device['gpu']} GPU; host " if device.get("gpu") else ""
    lines.append(f"\n{where}{device['cpu']}, {device['physical_cores']} cores ({threads}). "
                 f"Reproduce: `{record['command']}`")
    if record.get("summary_md"):
        lines.append(f"\n{record['summary_md']}")
    return "\n".join(lines)
