"""How a synthetic cine looks: the "clinical" default, moved toward real coronary cines, and the
"classic" look of the first generator (kept for tests and records that rely on it).

notes/real_angiography.md measured 17 real 512² cines against the classic look: real motion is
4-8x larger (median optical flow 4.0 px/frame against 0.89), grain noise 2.5x weaker and smoother
(flat-region std 4.9 against 12.3 grey levels; Laplacian variance 520 against 3,930), vessels
darker, backgrounds busy (sternal wires, ECG leads) and often collimated (black borders). The
clinical look closes these gaps; `benchmarks/bench_synthetic.py` measures both looks with the
note's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from rau_rt.errors import InputError
from rau_rt.synthetic.dynamics import Motion

COLLIMATION_MAX_FRACTION = 0.14  # a collimator blade covers at most this much of a side


@dataclass(frozen=True)
class Look:
    """Appearance parameters of one look (all per sequence; each seed draws within them)."""

    motion: Motion  # the default motion when a caller gives none
    counts_range: tuple[float, float]  # quanta per pixel behind the thinnest tissue (dose)
    grain_px: float  # blur of the quantum noise at 512² (0: white; real cines are smoother)
    iodine_gain: float  # scales the iodine attenuation (1: diluted 1:2 by blood)
    twigs_per_25mm: float  # unlabelled side branches per 25 mm of labelled vessel
    wires: bool  # sternal wires and ECG leads may appear
    collimation: float  # chance that collimator blades cover 1-3 sides
    pan_px: float  # table panning: amplitude of a slow back-and-forth shift at 512²
    window_room: tuple[float, float]  # display window widened below / above frame 0's range


LOOKS: dict[str, Look] = {
    "classic": Look(Motion(15.0, 6.0), (400.0, 3000.0), 0.0, 1.0, 1.0, False, 0.0, 0.0,
                    (0.25, 0.0)),
    # cardiac 32 px + respiratory 16 px + a pan of up to 45 px (all at 512²)
    "clinical": Look(Motion(32.0, 16.0), (700.0, 3000.0), 0.6, 1.45, 2.0, True, 0.6, 45.0,
                     (0.1, 0.35)),
}


def look_named(name: str) -> Look:
    """The look called `name`; InputError naming the choices otherwise."""
    if name not in LOOKS:
        raise InputError(f"look {name!r}: expected one of {sorted(LOOKS)}")
    return LOOKS[name]


def _draw_wire_loop(canvas: np.ndarray, centre: np.ndarray, mm: float,
                    rng: np.random.Generator) -> None:
    """A twisted sternal wire: a small figure-eight loop with a twisted tail."""
    half_w, half_h = rng.uniform(5, 9) * mm, rng.uniform(2.5, 4.5) * mm
    tilt = rng.uniform(-20, 20)
    thick = max(1, round(1.2 * mm))
    c = (int(centre[0] * 16), int(centre[1] * 16))
    axes = (int(half_w * 16), int(half_h * 16))
    cv2.ellipse(canvas, c, axes, tilt, 0, 360, 1.0, thick, cv2.LINE_AA, 4)
    tail = centre + np.array([rng.uniform(-1, 1) * half_w, half_h + rng.uniform(3, 7) * mm])
    cv2.line(canvas, c, (int(tail[0] * 16), int(tail[1] * 16)), 1.0, thick + 1, cv2.LINE_AA, 4)


def _draw_lead(canvas: np.ndarray, size: int, mm: float, rng: np.random.Generator) -> None:
    """An ECG lead: a smooth wire across the field ending in an electrode snap."""
    start = rng.uniform(0.0, 1.0, 2) * size
    heading = rng.uniform(0, 2 * np.pi)
    points = [start]
    for _ in range(int(rng.integers(6, 12))):
        heading += rng.normal(0, 0.35)
        points.append(points[-1] + 18 * mm * np.array([np.cos(heading), np.sin(heading)]))
    path = (np.array(points) * 16).astype(np.int32)
    cv2.polylines(canvas, [path], False, 0.45, max(1, round(0.7 * mm)), cv2.LINE_AA, 4)
    end = tuple(int(v) for v in path[-1])
    cv2.circle(canvas, end, int(5 * mm * 16), 0.25, max(1, round(1.5 * mm)), cv2.LINE_AA, 4)
    cv2.circle(canvas, end, int(1.5 * mm * 16), 0.8, -1, cv2.LINE_AA, 4)


@dataclass(frozen=True)
class Pan:
    """The table panned back and forth: offset(t) = amplitude · direction · sin(2πt/period + φ)."""

    offset_px: np.ndarray  # (2,) amplitude times unit direction
    period_s: float
    phase: float

    def at(self, t: float) -> np.ndarray:
        return self.offset_px * np.sin(2 * np.pi * t / self.period_s + self.phase)


def make_pan(rng: np.random.Generator, look: Look, size: int) -> Pan | None:
    if look.pan_px <= 0:
        return None
    angle = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0.3, 1.0) * look.pan_px * size / 512
    return Pan(amplitude * np.array([np.cos(angle), np.sin(angle)]), float(rng.uniform(3, 6)),
               float(rng.uniform(0, 2 * np.pi)))


def devices(rng: np.random.Generator, size: int, mm_per_px: float, centre_x: float) -> np.ndarray:
    """Attenuation of sternal wires (a column near the midline) and 0-2 ECG leads, size²."""
    canvas = np.zeros((size, size), np.float32)
    mm = 1.0 / mm_per_px
    if rng.uniform() < 0.5:  # about half of the patients had sternotomy (CABG) in a cath lab
        x = centre_x + rng.uniform(-25, 25) * mm
        top = rng.uniform(-0.1, 0.3) * size
        for k in range(int(rng.integers(4, 7))):
            _draw_wire_loop(canvas, np.array([x + rng.normal(0, 2) * mm, top + k * 24 * mm]),
                            mm, rng)
        canvas *= 1.6  # stainless steel: far denser than iodinated blood
    for _ in range(int(rng.integers(0, 3))):
        _draw_lead(canvas, size, mm, rng)
    return canvas


def collimation(rng: np.random.Generator, size: int, chance: float) -> np.ndarray | None:
    """A bool map of the open field (False under a collimator blade), or None (no blades)."""
    if rng.uniform() >= chance:
        return None
    open_field = np.ones((size, size), bool)
    sides = rng.choice(4, size=int(rng.integers(1, 4)), replace=False)
    for side in sides:
        depth = max(1, int(rng.uniform(0.03, COLLIMATION_MAX_FRACTION) * size))
        if side == 0:
            open_field[:, :depth] = False
        elif side == 1:
            open_field[:, size - depth:] = False
        elif side == 2:
            open_field[:depth] = False
        else:
            open_field[size - depth:] = False
    return open_field
