"""PNG charts of a run's latency, drawn with OpenCV (the runtime carries no plotting library).

`latency_plot`: end-to-end latency per frame over the run's time, with the deadline and the
p50/p99 lines. `stage_chart`: one horizontal bar per stage at its p50, a whisker to its p99.
Both write atomically (a `.partial` file renamed into place).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from rau_rt.errors import InputError

WIDTH, HEIGHT = 960, 420
MARGIN = {"left": 70, "right": 20, "top": 40, "bottom": 50}
FONT = cv2.FONT_HERSHEY_SIMPLEX
INK, GRID, LINE = (40, 40, 40), (225, 225, 225), (180, 90, 30)
DEADLINE, P50, P99 = (40, 40, 200), (60, 150, 60), (0, 140, 230)


def _nice_step(span: float, ticks: int = 6) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _text(image: np.ndarray, text: str, x: int, y: int, colour=INK, scale=0.45,
          align: str = "left") -> None:
    (w, h), _ = cv2.getTextSize(text, FONT, scale, 1)
    x = {"left": x, "right": x - w, "center": x - w // 2}[align]
    cv2.putText(image, text, (x, y + h // 2), FONT, scale, colour, 1, cv2.LINE_AA)


def _write(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise InputError(f"{path}: PNG encoding failed")
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data.tobytes())
    os.replace(partial, path)
    return path


def _dashed(image: np.ndarray, y: int, x0: int, x1: int, colour) -> None:
    for x in range(x0, x1, 12):
        cv2.line(image, (x, y), (min(x + 6, x1), y), colour, 1, cv2.LINE_AA)


def _axes(image: np.ndarray, px, y_range: tuple[float, float], x_max: float) -> None:
    """Grid lines and labels at round y values, x ticks from 0, and the plot frame; `px` maps
    (x, y) data arrays to pixel points."""
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    top, bottom = MARGIN["top"], HEIGHT - MARGIN["bottom"]
    lo, hi = y_range
    step = _nice_step(hi - lo)
    for k in range(int((hi - lo) / step) + 1):
        yy = int(px(np.zeros(1), np.array([lo + k * step]))[0, 1])
        cv2.line(image, (left, yy), (right, yy), GRID, 1)
        _text(image, f"{lo + k * step:g}", left - 6, yy, align="right")
    step = _nice_step(x_max)
    for k in range(int(x_max / step) + 1):
        xx = int(px(np.array([k * step]), np.zeros(1))[0, 0])
        cv2.line(image, (xx, bottom), (xx, bottom + 4), INK, 1)
        _text(image, f"{k * step:g}", xx, bottom + 14, align="center")
    cv2.rectangle(image, (left, top), (right, bottom), INK, 1)


def latency_plot(path: str | Path, times_s: Sequence[float], latency_ms: Sequence[float], *,
                 deadline_ms: float | None = None, title: str = "end-to-end latency") -> Path:
    """Latency (ms) against time (s since the first frame) as a PNG at `path`."""
    t = np.asarray(times_s, dtype=np.float64)
    y = np.asarray(latency_ms, dtype=np.float64)
    if t.shape != y.shape or t.size == 0:
        raise InputError(f"latency plot: expected equal, non-empty series, got {t.shape} and "
                         f"{y.shape}")
    t = t - t[0]
    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    top, bottom = MARGIN["top"], HEIGHT - MARGIN["bottom"]
    y_max = max(float(y.max()), deadline_ms or 0.0) * 1.1 or 1.0
    t_max = float(t.max()) or 1.0

    def px(tt: np.ndarray, yy: np.ndarray) -> np.ndarray:
        xs = left + tt / t_max * (right - left)
        ys = bottom - yy / y_max * (bottom - top)
        return np.stack([xs, ys], axis=-1).round().astype(np.int32)

    _axes(image, px, (0.0, y_max), t_max)
    cv2.polylines(image, [px(t, y)], False, LINE, 1, cv2.LINE_AA)
    legend = []
    p50, p99 = np.percentile(y, (50, 99))
    for value, colour, name in ((p50, P50, "p50"), (p99, P99, "p99"),
                                (deadline_ms, DEADLINE, "deadline")):
        if value is None:
            continue
        yy = int(px(np.zeros(1), np.array([value]))[0, 1])
        _dashed(image, yy, left, right, colour)
        legend.append((f"{name} {value:.1f} ms", colour))
    x = left
    for text, colour in legend:
        _text(image, text, x, top - 12, colour)
        x += cv2.getTextSize(text, FONT, 0.45, 1)[0][0] + 24
    _text(image, title, right, top - 12, align="right", scale=0.5)
    _text(image, "time since first frame (s)", (left + right) // 2, HEIGHT - 14, align="center")
    _text(image, "ms", 8, (top + bottom) // 2)
    return _write(path, image)


def stage_chart(path: str | Path, stages: Mapping[str, Mapping[str, float | None]], *,
                title: str = "latency per stage") -> Path:
    """Per stage: a bar at p50 and a whisker to p99 (ms), as a PNG at `path`."""
    rows = [(name, s["p50"], s["p99"]) for name, s in stages.items() if s.get("p50") is not None]
    if not rows:
        raise InputError("stage chart: no stage has samples")
    bar, gap = 22, 10
    label_w = max(cv2.getTextSize(n, FONT, 0.45, 1)[0][0] for n, _, _ in rows) + 16
    height = MARGIN["top"] + MARGIN["bottom"] + len(rows) * (bar + gap)
    image = np.full((height, WIDTH, 3), 255, np.uint8)
    left, right = label_w, WIDTH - MARGIN["right"] - 90
    top, bottom = MARGIN["top"], height - MARGIN["bottom"]
    x_max = max(p99 for _, _, p99 in rows) * 1.05 or 1.0
    step = _nice_step(x_max)
    for k in range(int(x_max / step) + 1):
        xx = int(left + k * step / x_max * (right - left))
        cv2.line(image, (xx, top), (xx, bottom), GRID, 1)
        _text(image, f"{k * step:g}", xx, bottom + 14, align="center")
    for i, (name, p50, p99) in enumerate(rows):
        y0 = top + gap // 2 + i * (bar + gap)
        x50 = int(left + p50 / x_max * (right - left))
        x99 = int(left + p99 / x_max * (right - left))
        cv2.rectangle(image, (left, y0), (max(x50, left + 1), y0 + bar), LINE, -1)
        cv2.line(image, (x50, y0 + bar // 2), (x99, y0 + bar // 2), INK, 1)
        cv2.line(image, (x99, y0 + 4), (x99, y0 + bar - 4), INK, 1)
        _text(image, name, left - 8, y0 + bar // 2, align="right")
        _text(image, f"{p50:.1f} / {p99:.1f}", x99 + 6, y0 + bar // 2)
    cv2.line(image, (left, top), (left, bottom), INK, 1)
    _text(image, f"{title}: p50 bar, p99 whisker (ms)", left, top - 16, scale=0.5)
    return _write(path, image)


SERIES = ((180, 90, 30), (60, 150, 60), (0, 140, 230), (40, 40, 200), (150, 60, 150))


def _panel(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str,
           y_label: str, x_label: str, y_range: tuple[float, float] | None) -> np.ndarray:
    image = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    top, bottom = MARGIN["top"], HEIGHT - MARGIN["bottom"]
    finite = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in series.values()]
    xs = np.concatenate([x for x, _ in finite]) if finite else np.zeros(1)
    ys = np.concatenate([y[np.isfinite(y)] for _, y in finite]) if finite else np.zeros(1)
    x_max = float(xs.max()) if xs.size else 1.0
    x_max = x_max or 1.0
    lo, hi = y_range if y_range is not None else (0.0, float(ys.max()) * 1.1 if ys.size else 1.0)
    hi = hi if hi > lo else lo + 1.0

    def px(xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        return np.stack([left + xx / x_max * (right - left),
                         bottom - (yy - lo) / (hi - lo) * (bottom - top)],
                        axis=-1).round().astype(np.int32)

    _axes(image, px, (lo, hi), x_max)
    x = left
    for (name, (sx, sy)), colour in zip(series.items(), SERIES * 4, strict=False):
        sx, sy = np.asarray(sx, np.float64), np.asarray(sy, np.float64)
        keep = np.isfinite(sy)
        if keep.sum() >= 2:
            cv2.polylines(image, [px(sx[keep], np.clip(sy[keep], lo, hi))], False, colour, 1,
                          cv2.LINE_AA)
        _text(image, name, x, top - 12, colour)
        x += cv2.getTextSize(name, FONT, 0.45, 1)[0][0] + 24
    _text(image, title, right, top - 12, align="right", scale=0.5)
    _text(image, x_label, (left + right) // 2, HEIGHT - 14, align="center")
    _text(image, y_label, 8, (top + bottom) // 2)
    return image


def training_curve(path: str | Path, steps: Sequence[int], losses: Sequence[float],
                   validation: Sequence[Mapping[str, float]]) -> Path:
    """A run's training loss (top) and its validation scores in [0, 1] (bottom) over steps."""
    names = [k for k in (validation[0] if validation else {}) if k != "step"]
    scores = {name: ([v["step"] for v in validation], [v[name] for v in validation])
              for name in names}
    top = _panel({"loss": (steps, losses)}, "training loss", "loss", "step", None)
    bottom = _panel(scores, "validation", "", "step", (0.0, 1.0))
    return _write(path, np.vstack([top, bottom]))
