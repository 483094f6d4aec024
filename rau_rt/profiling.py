"""Latency statistics of a run: percentiles, jitter, tail, deadline misses, peak memory.

`RunProfile` is a sink (`write(frame, result)`) that keeps each frame's end-to-end latency and
per-stage times; `summary()` turns them into the numbers `rau-rt run` and `rau-rt bench` report.
Definitions (all in milliseconds over the processed frames):

| key | meaning |
|---|---|
| p50, p90, p99, max, mean | percentiles (linear interpolation), maximum, mean |
| jitter | p90 - p10: how much a typical frame's latency varies |
| tail | max - p95: how far the worst frames stand out |
| deadline_miss_rate | fraction of frames slower than the deadline (one source frame interval) |
"""

from __future__ import annotations

import platform
import resource
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from rau_rt.types import Frame, FrameResult

STAT_KEYS = ("p50", "p90", "p99", "max", "mean", "jitter", "tail")


def latency_stats(samples_ms: Sequence[float] | np.ndarray,
                  deadline_ms: float | None = None) -> dict[str, float | int | None]:
    """The module docstring's statistics of one series of latencies (ms)."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        return {"count": 0, **dict.fromkeys(STAT_KEYS), "deadline_miss_rate": None}
    p10, p50, p90, p95, p99 = np.percentile(values, (10, 50, 90, 95, 99))
    peak = float(values.max())
    return {
        "count": int(values.size), "p50": float(p50), "p90": float(p90), "p99": float(p99),
        "max": peak, "mean": float(values.mean()), "jitter": float(p90 - p10),
        "tail": float(peak - p95),
        "deadline_miss_rate": (None if deadline_ms is None
                               else float(np.mean(values > deadline_ms))),
    }


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def package_version(dist: str) -> str | None:
    """An installed distribution's version, None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None

def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class RunProfile:
    """Collects every result's timings (a sink: pass it to `Pipeline.run`)."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.timestamps_s: list[float] = []
        self.latency_ms: list[float] = []
        self.stage_ms: dict[str, list[float]] = {}

    def write(self, frame: Frame, result: FrameResult) -> None:
        self.indices.append(result.index)
        self.timestamps_s.append(result.timestamp_s)
        self.latency_ms.append(result.latency_ms)
        for stage, ms in result.stage_ms.items():
            self.stage_ms.setdefault(stage, []).append(ms)

    def close(self) -> None:  # the sink interface; nothing to publish
        pass

    def __len__(self) -> int:
        return len(self.latency_ms)

    def recent(self, frames: int = 100) -> dict[str, float | int | None]:
        """Statistics of the last `frames` results (progress bars)."""
        return latency_stats(self.latency_ms[-frames:])

    def summary(self, deadline_ms: float | None = None,
                skip_first: int = 0) -> dict[str, object]:
        """End-to-end and per-stage statistics; `skip_first` leaves out warm-up frames."""
        stages = {stage: latency_stats(values[skip_first:])
                  for stage, values in self.stage_ms.items()}
        return {
            "frames": len(self.latency_ms), "warmup_frames": min(skip_first, len(self)),
            "deadline_ms": deadline_ms,
            "end_to_end": latency_stats(self.latency_ms[skip_first:], deadline_ms),
            "stages": stages, "peak_rss_mib": peak_rss_mib(),
        }


def markdown_table(summary: Mapping[str, object]) -> str:
    """A Markdown latency table of `RunProfile.summary()`: end to end, then each stage."""
    keys = ("p50", "p90", "p99", "max", "jitter", "tail")
    lines = ["| stage | " + " | ".join(f"{k} ms" for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    rows = [("end to end", summary["end_to_end"]), *summary["stages"].items()]
    for name, stats in rows:
        cells = ["-" if stats[k] is None else f"{stats[k]:.1f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    e2e = summary["end_to_end"]
    if summary.get("deadline_ms") is not None and e2e["deadline_miss_rate"] is not None:
        lines.append("")
        lines.append(f"deadline {summary['deadline_ms']:.1f} ms (one frame interval): "
                     f"{100 * e2e['deadline_miss_rate']:.1f} % of frames missed it")
    return "\n".join(lines)
