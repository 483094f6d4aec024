"""Time: cardiac and respiratory motion with rest phases, and the contrast bolus."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rau_rt.errors import InputError

HEART_RATE_RANGE_BPM = (50.0, 110.0)  # physiology; a cycle of 0.55-1.2 s
CARDIAC_RANGE_PX = (0.0, 40.0)  # in-plane excursion swept to stress tracking (at 512²)
RESPIRATORY_RANGE_PX = (0.0, 30.0)  # Shechter 2004 (IEEE TMI 23:1046): 2.4-8.0 mm caudal shift
SYSTOLE_S = 0.30  # contraction to end-systole
# Rest phases with motion below 1 mm (Shechter 2005, Med Phys 32:255): end-systolic 76-80 ms,
# mid-diastolic 65-112 ms; diastole fills the remainder of the cycle.
END_SYSTOLIC_REST_S = 0.08
RELAXATION_S = 0.16
BREATH_PERIOD_S = 4.0  # 15 breaths per minute
# TIMI frame counts (Gibson 1996, Circulation 93:879): 20-36 frames at 30 fps, so the distal
# vessel fills 0.6-1.3 s after the front leaves the ostium.
FILL_TIME_RANGE_S = (0.6, 1.3)
FRONT_WIDTH_S = 0.08  # the bolus front's sigmoid rise
PLATEAU_BEATS = (2.0, 4.0)  # opacified plateau before washout
WASHOUT_TAU_S = 0.6  # exponential clearance once injection stops
PRESENT_FRACTION = 0.2  # a segment is present when >= 20 % of its centerline is opacified
OPACIFIED = 0.5  # a centerline sample counts as opacified at half its full contrast


@dataclass(frozen=True)
class Motion:
    """Motion amplitudes at the output size, in pixels, and their rates."""

    cardiac_px: float = 15.0
    respiratory_px: float = 6.0
    heart_rate_bpm: float = 72.0

    def __post_init__(self) -> None:
        _in_range("motion cardiac_px", self.cardiac_px, CARDIAC_RANGE_PX, "px")
        _in_range("motion respiratory_px", self.respiratory_px, RESPIRATORY_RANGE_PX, "px")
        _in_range("motion heart_rate_bpm", self.heart_rate_bpm, HEART_RATE_RANGE_BPM, "bpm")


def _in_range(name: str, value: float, bounds: tuple[float, float], unit: str) -> None:
    if not bounds[0] <= value <= bounds[1]:
        raise InputError(f"{name}: expected {bounds[0]:g}..{bounds[1]:g} {unit}, got {value}")


def cardiac_phase_weight(t: np.ndarray, heart_rate_bpm: float, phase0: float) -> np.ndarray:
    """Contraction in [0, 1]: 0 at end-diastole, 1 at end-systole, with both rest phases."""
    cycle = 60.0 / heart_rate_bpm
    scale = min(1.0, 0.9 * cycle / (SYSTOLE_S + END_SYSTOLIC_REST_S + RELAXATION_S))
    rise, hold, fall = SYSTOLE_S * scale, END_SYSTOLIC_REST_S * scale, RELAXATION_S * scale
    tau = np.mod(np.asarray(t, dtype=np.float64) + phase0 * cycle, cycle)
    w = np.zeros_like(tau)
    up = tau < rise
    w[up] = 0.5 - 0.5 * np.cos(np.pi * tau[up] / rise)
    w[(tau >= rise) & (tau < rise + hold)] = 1.0
    down = (tau >= rise + hold) & (tau < rise + hold + fall)
    w[down] = 0.5 + 0.5 * np.cos(np.pi * (tau[down] - rise - hold) / fall)
    return w


def respiratory_weight(t: np.ndarray, phase0: float) -> np.ndarray:
    """Inspiration in [0, 1] (a raised cosine over one breath)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * (np.asarray(t) / BREATH_PERIOD_S + phase0))


@dataclass(frozen=True)
class MotionField:
    """Per-sequence motion: displacement (pixels) = cardiac(t)·field(p) + respiratory(t)·drift.

    `field` is a contraction toward a centre plus a common swing, scaled so that the tree's
    most mobile point moves exactly `Motion.cardiac_px` from end-diastole at end-systole and
    no point more; the drift has length `Motion.respiratory_px`, so no point ever moves more
    than their sum.
    """

    motion: Motion
    centre: np.ndarray  # (2,) centre of contraction, pixels
    swing: np.ndarray  # (2,) common translation direction, unit
    drift: np.ndarray  # (2,) respiratory direction, unit (mostly head-foot)
    cardiac_phase0: float
    respiratory_phase0: float
    reach_px: float  # distance from the centre to the farthest point of the tree
    gain: float  # scales the tree's largest raw displacement to 1

    def displacement(self, xy: np.ndarray, t: float) -> np.ndarray:
        """Displacement of pixel positions `xy` (n, 2) at time t seconds."""
        w_c = float(cardiac_phase_weight(np.array([t]), self.motion.heart_rate_bpm,
                                         self.cardiac_phase0)[0])
        w_r = float(respiratory_weight(np.array([t]), self.respiratory_phase0)[0])
        return w_c * self.cardiac_px_field(xy) + w_r * self.motion.respiratory_px * self.drift

    def cardiac_px_field(self, xy: np.ndarray) -> np.ndarray:
        toward = (self.centre - xy) / self.reach_px
        raw = self.gain * (0.6 * toward + 0.4 * self.swing)
        # the tree's most mobile point moves exactly cardiac_px; nothing moves more
        norm = np.maximum(1.0, np.linalg.norm(raw, axis=1, keepdims=True))
        return self.motion.cardiac_px * raw / norm


def make_motion_field(rng: np.random.Generator, motion: Motion, rest_xy: np.ndarray) -> MotionField:
    """Centre of contraction inside the tree's extent (about 91 % of epicardial motion is
    directed toward one moving centre: Arts/Potel 1984)."""
    lo, hi = rest_xy.min(axis=0), rest_xy.max(axis=0)
    centre = lo + (hi - lo) * rng.uniform(0.35, 0.65, 2)
    reach = float(np.linalg.norm(rest_xy - centre, axis=1).max()) + 1e-6
    angle = rng.uniform(0, 2 * np.pi)
    swing = np.array([np.cos(angle), np.sin(angle)])
    tilt = rng.uniform(-0.3, 0.3)  # inspiration moves the heart caudally, slightly rotated
    raw = 0.6 * (centre - rest_xy) / reach + 0.4 * swing
    gain = 1.0 / max(float(np.linalg.norm(raw, axis=1).max()), 1e-6)
    return MotionField(motion, centre, swing, np.array([np.sin(tilt), np.cos(tilt)]),
                       float(rng.uniform()), float(rng.uniform()), reach, gain)


@dataclass(frozen=True)
class Bolus:
    """Contrast timing: injection start, front speed along the tree, plateau, washout."""

    start_s: float
    speed_mm_s: float
    washout_s: float  # when the ostium starts clearing

    def opacity(self, path_mm: np.ndarray, t: float) -> np.ndarray:
        """Fraction of full iodine concentration at distances `path_mm` from the ostium."""
        arrival = self.start_s + path_mm / self.speed_mm_s
        # a logistic rise written with tanh, which cannot overflow however far the front is
        rise = 0.5 + 0.5 * np.tanh((t - arrival - 2 * FRONT_WIDTH_S) / (FRONT_WIDTH_S / 2))
        rise = np.where(t < arrival, 0.0, rise)  # nothing ahead of the front
        clear = self.washout_s + path_mm / self.speed_mm_s
        fade = np.exp(-np.maximum(t - clear, 0.0) / WASHOUT_TAU_S)
        return rise * fade

    def injecting(self, t: float) -> bool:
        return self.start_s <= t < self.washout_s


def make_bolus(rng: np.random.Generator, start_s: float, longest_path_mm: float,
               heart_rate_bpm: float) -> Bolus:
    fill = rng.uniform(*FILL_TIME_RANGE_S)
    plateau = rng.uniform(*PLATEAU_BEATS) * 60.0 / heart_rate_bpm
    return Bolus(start_s, longest_path_mm / fill, start_s + fill + plateau)
