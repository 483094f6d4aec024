"""Latency statistics of a run: percentiles, jitter, tail, deadline misses, peak memory.

`RunProfile` is a sink (`write(frame, result)`) that keeps each frame's end-to-end latency and
per-stage times; `summary()` turns them into the numbers `rau-rt run` and `rau-rt bench` report.
Definitions (all in milliseconds over the processed frames):

| key | meaning |
|---|---|
| p50, p90, p99, max, mean, std | percentiles (linear interpolation), maximum, mean, std. dev. |
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

STAT_KEYS = ("p50", "p90", "p99", "max", "mean", "std", "jitter", "tail")


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
        "max": peak, "mean": float(values.mean()), "std": float(values.std()),
        "jitter": float(p90 - p10),
        "tail": float(peak - p95),
        "deadline_miss_rate": (None if deadline_ms is None
                               else float(np.mean(values > deadline_ms))),
    }


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB.

    On Linux, the memory map's high-water mark (/proc/self/status VmHWM): `ru_maxrss` carries
    over an exec from the forked parent's memory, so a process started by a large one (a
    benchmark that spawns an export) would report the parent's size as its own floor
    (13.5 GB for a 3B-class export spawned by bench_vlm, whose own peak was lower).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def reset_peak_rss() -> bool:
    """Start this process's high-water mark (`peak_rss_mib`) over from its current RSS, so that
    the next reading is the peak since now (Linux: "5" into /proc/self/clear_refs, Linux 4.0
    and later). Returns whether it could; where not, the mark keeps counting from the start."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's
    `malloc_trim`; elsewhere only the collection). After a large model is freed, glibc keeps
    gigabytes of its heap (2.5 GB after the 0.5B-class VLM export's reference stage), which
    would sit under every later allocation's peak."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


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


# Histogram of a long run's latencies: 0.001 ms to 1000 s in bins 0.35 % wide (about 6,000
# int64 counts, 47 KiB per series, however long the run).
HISTOGRAM_EDGES = np.geomspace(1e-3, 1e6, 6001)
HISTOGRAM_RELATIVE_ERROR = float(HISTOGRAM_EDGES[1] / HISTOGRAM_EDGES[0] - 1)
HEAD_FRAMES = 1000  # kept exactly from the start, so warm-up frames can be left out later


class LatencySeries:
    """One latency series in bounded memory.

    Keeps the first `HEAD_FRAMES` values, the last `keep` values (a ring) and a log-spaced
    histogram of all of them. While the run fits the ring, `stats` are exact (`latency_stats`
    over every value); beyond, they come from the histogram: percentiles within
    `HISTOGRAM_RELATIVE_ERROR`, count, mean and max exact.
    """

    def __init__(self, keep: int) -> None:
        if keep < HEAD_FRAMES:
            raise ValueError(f"keep: expected >= {HEAD_FRAMES}, got {keep}")
        self._ring = np.empty(keep, np.float64)
        self._head: list[float] = []
        self._hist = np.zeros(HISTOGRAM_EDGES.size + 1, np.int64)
        self._count, self._sum, self._max_after_head = 0, 0.0, -np.inf

    def __len__(self) -> int:
        return self._count

    @property
    def exact(self) -> bool:
        return self._count <= self._ring.size

    def add(self, value: float) -> None:
        self._ring[self._count % self._ring.size] = value
        if len(self._head) < HEAD_FRAMES:
            self._head.append(value)
        else:
            self._max_after_head = max(self._max_after_head, value)
        self._hist[np.searchsorted(HISTOGRAM_EDGES, value)] += 1
        self._count += 1
        self._sum += value

    def last(self, n: int | None = None) -> np.ndarray:
        """The last `n` values (at most `keep`; all kept when None), oldest first."""
        kept = min(self._count, self._ring.size)
        n = kept if n is None else min(n, kept)
        end = self._count % self._ring.size
        return np.roll(self._ring, -end)[self._ring.size - n:] if self._count > self._ring.size \
            else self._ring[self._count - n:self._count].copy()

    def stats(self, deadline_ms: float | None = None,
              skip_first: int = 0) -> dict[str, float | int | None]:
        """`latency_stats` of every value after the first `skip_first` (<= HEAD_FRAMES)."""
        skip = min(skip_first, self._count)
        if self.exact:
            return latency_stats(self._ring[skip:self._count], deadline_ms)
        skipped = np.asarray(self._head[:skip], np.float64)
        hist = self._hist.copy()
        np.subtract.at(hist, np.searchsorted(HISTOGRAM_EDGES, skipped), 1)
        count = self._count - skip
        peak = max(self._max_after_head, max(self._head[skip:], default=-np.inf))
        cumulative = np.cumsum(hist)

        def quantile(q: float) -> float:
            rank = q * (count - 1)
            k = int(np.searchsorted(cumulative, rank, side="right"))
            low = HISTOGRAM_EDGES[k - 1] if k > 0 else 0.0
            high = HISTOGRAM_EDGES[k] if k < HISTOGRAM_EDGES.size else peak
            before = cumulative[k - 1] if k > 0 else 0
            within = (rank - before + 0.5) / max(hist[k], 1)
            return float(min(low + (high - low) * within, peak))

        p10, p50, p90, p95, p99 = (quantile(q) for q in (0.10, 0.50, 0.90, 0.95, 0.99))
        missed = None
        if deadline_ms is not None:
            k = int(np.searchsorted(HISTOGRAM_EDGES, deadline_ms))
            missed = float(hist[k + 1:].sum() / count)  # bins wholly above the deadline
        mean = (self._sum - float(skipped.sum())) / count
        centres = np.concatenate([[HISTOGRAM_EDGES[0]], np.sqrt(HISTOGRAM_EDGES[:-1]
                                                                * HISTOGRAM_EDGES[1:]), [peak]])
        std = float(np.sqrt(max(0.0, (hist * (centres - mean) ** 2).sum() / count)))
        return {"count": int(count), "p50": p50, "p90": p90, "p99": p99, "max": float(peak),
                "mean": mean, "std": std, "jitter": p90 - p10, "tail": float(peak - p95),
                "deadline_miss_rate": missed}


class RunProfile:
    """Collects every result's timings (a sink: pass it to `Pipeline.run`), in memory that stays
    flat however long the stream: the last `keep` frames (one hour at 30 fps by default) are kept
    exactly for the latency plot and, while the run fits, exact statistics; a longer run's
    statistics come from histograms (`LatencySeries`; the summary says which)."""

    def __init__(self, keep: int = 108_000) -> None:
        self.keep = keep
        self._indices = LatencySeries(keep)
        self._timestamps = LatencySeries(keep)
        self._latency = LatencySeries(keep)
        self._stages: dict[str, LatencySeries] = {}

    def write(self, frame: Frame, result: FrameResult) -> None:
        self._indices.add(result.index)
        self._timestamps.add(result.timestamp_s)
        self._latency.add(result.latency_ms)
        for stage, ms in result.stage_ms.items():
            if stage not in self._stages:
                self._stages[stage] = LatencySeries(self.keep)
            self._stages[stage].add(ms)

    def close(self) -> None:  # the sink interface; nothing to publish
        pass

    def __len__(self) -> int:
        return len(self._latency)

    @property
    def indices(self) -> list[int]:
        """Frame indices of the kept (last `keep`) frames."""
        return [int(v) for v in self._indices.last()]

    @property
    def timestamps_s(self) -> list[float]:
        return self._timestamps.last().tolist()

    @property
    def latency_ms(self) -> list[float]:
        return self._latency.last().tolist()

    @property
    def stage_ms(self) -> dict[str, list[float]]:
        return {stage: series.last().tolist() for stage, series in self._stages.items()}

    def recent(self, frames: int = 100) -> dict[str, float | int | None]:
        """Statistics of the last `frames` results (progress bars)."""
        return latency_stats(self._latency.last(frames))

    def summary(self, deadline_ms: float | None = None,
                skip_first: int = 0) -> dict[str, object]:
        """End-to-end and per-stage statistics; `skip_first` (at most HEAD_FRAMES) leaves out
        warm-up frames."""
        skip_first = min(skip_first, HEAD_FRAMES)
        stages = {stage: series.stats(skip_first=skip_first)
                  for stage, series in self._stages.items()}
        summary = {
            "frames": len(self), "warmup_frames": min(skip_first, len(self)),
            "deadline_ms": deadline_ms,
            "end_to_end": self._latency.stats(deadline_ms, skip_first),
            "stages": stages, "peak_rss_mib": peak_rss_mib(),
        }
        if not self._latency.exact:
            summary["statistics"] = (f"histogram over all {len(self)} frames (percentiles "
                                     f"within {100 * HISTOGRAM_RELATIVE_ERROR:.2f} %); the "
                                     f"plot shows the last {self.keep}")
        return summary


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
