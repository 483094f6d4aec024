"""Image formation: Beer-Lambert line integrals of tubes and anatomy, detector blur and noise.

Everything is attenuation (the exponent μ·L, dimensionless) until `expose`, which turns it into
detector counts I = I₀·exp(-Σ μᵢLᵢ), adds quantum and electronic noise and log-encodes 12 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from rau_rt.synthetic.look import Look, collimation, devices

# Iodine: effective mass attenuation (mu/rho) about 12.25 cm²/g at 60-80 kVp with 300 mgI/mL
# contrast (a published flow simulator), diluted about 1:2 by blood: 12.25·0.3·0.5 = 1.8 /cm.
MU_IODINE_PER_MM = 0.18
# A 6F catheter: 2.0 mm outer diameter, about 1.4 mm lumen; the braided wall reads like
# about 0.3 /mm of attenuation.
CATHETER_OUTER_RADIUS_MM = 1.0
CATHETER_INNER_RADIUS_MM = 0.7
MU_CATHETER_WALL_PER_MM = 0.3
BITS_STORED = 12  # XA DICOM stores 12 of 16 bits
MAX_VALUE = (1 << BITS_STORED) - 1
BLUR_RANGE_PX = (0.5, 1.2)  # detector and focal-spot blur sigma at 512²
ELECTRONIC_NOISE = 0.015  # Gaussian read noise, as a fraction of the unattenuated counts
# The log-encoding spans this many units of attenuation below the unattenuated level.
LOG_RANGE = 3.2


@dataclass(frozen=True)
class Tube:
    """A tube already projected into one frame: pixel centerline and per-sample properties."""

    xy: np.ndarray  # (n, 2) pixel centres (x, y)
    radius_mm: np.ndarray  # (n,)
    mm_per_px: np.ndarray  # (n,) at each sample's depth (isocentre spacing / magnification)
    mu_per_mm: np.ndarray  # (n,) attenuation of what fills the lumen


@dataclass(frozen=True)
class TubeRaster:
    """A tube rasterized in a crop of the frame."""

    origin: tuple[int, int]  # (x, y) of the crop's [0, 0] in the frame
    attenuation: np.ndarray  # float32 crop
    sample: np.ndarray  # int32 crop: nearest centerline sample per pixel
    inside: np.ndarray  # bool crop: pixel within the lumen's projected radius


def rasterize(tube: Tube, size: int, outer_mm: np.ndarray | None = None) -> TubeRaster | None:
    """Chord lengths L = 2·√(r² - d²) of a tube, d from each pixel to its centerline.

    The centerline is drawn with one label per piece into a crop, and one distance transform
    with labels gives every pixel its distance to, and the index of, the nearest piece: cost
    grows with the crop, not with the number of samples. None when the tube is off the image.
    """
    r_px = tube.radius_mm / tube.mm_per_px
    reach = float(r_px.max()) + 2.0
    lo = np.floor(tube.xy.min(axis=0) - reach).astype(int)
    hi = np.ceil(tube.xy.max(axis=0) + reach).astype(int)
    x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
    x1, y1 = min(int(hi[0]), size), min(int(hi[1]), size)
    if x1 <= x0 or y1 <= y0:
        return None
    pieces = np.zeros((y1 - y0, x1 - x0), np.int32)
    fixed = np.round((tube.xy - (x0, y0)) * 16).astype(np.int32)  # 4 fractional bits
    for i in range(len(fixed) - 1):
        cv2.line(pieces, tuple(fixed[i]), tuple(fixed[i + 1]), i + 1, 1, cv2.LINE_8, 4)
    drawn = np.flatnonzero(pieces)
    if drawn.size == 0:
        return None
    dist, labels = cv2.distanceTransformWithLabels(
        (pieces == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5,
        labelType=cv2.DIST_LABEL_PIXEL)
    sample = pieces.ravel()[drawn][labels - 1] - 1  # piece i joins samples i and i + 1
    d_mm = dist * tube.mm_per_px[sample]
    r_mm = tube.radius_mm[sample]
    chord = 2.0 * np.sqrt(np.maximum(r_mm * r_mm - d_mm * d_mm, 0.0))
    attenuation = tube.mu_per_mm[sample] * chord
    if outer_mm is not None:  # a catheter's wall around its lumen
        ro = outer_mm[sample]
        wall = 2.0 * np.sqrt(np.maximum(ro * ro - d_mm * d_mm, 0.0)) - chord
        attenuation = attenuation + MU_CATHETER_WALL_PER_MM * wall
    inside = dist < np.maximum(r_px[sample], 0.5)
    return TubeRaster((x0, y0), attenuation.astype(np.float32), sample, inside)


def composite(image: np.ndarray, raster: TubeRaster) -> None:
    """Add a tube's attenuation into `image` (max where tubes of one tree meet, so junctions
    are not counted twice)."""
    x0, y0 = raster.origin
    h, w = raster.attenuation.shape
    view = image[y0:y0 + h, x0:x0 + w]
    np.maximum(view, raster.attenuation, out=view)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    up = cv2.resize(grid, (size + size * 3 // cells, size + size * 3 // cells),
                    interpolation=cv2.INTER_CUBIC)
    return up[:size, :size]


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)


@dataclass(frozen=True)
class Background:
    """Attenuation of the body: a moving layer (heart, diaphragm, ribs, lung, soft tissue) that
    breathes, a still layer (spine, table), and the field's vignetting."""

    moving: np.ndarray  # float32 (size + 2·pad)², shifted by the respiratory drift
    still: np.ndarray  # float32 size²
    pad: int
    gain: np.ndarray  # float32 size²: relative I₀ (vignetting; near 0 under collimator blades)
    open_field: np.ndarray | None  # bool size²: False under a collimator blade; None: no blades


def make_background(rng: np.random.Generator, size: int, heart_xy: np.ndarray,
                    primary_deg: float, mm_per_px: float, look: Look) -> Background:
    """Soft-tissue fBm, heart shadow, diaphragm dome, ribs and spine, all smooth and random;
    sternal wires, ECG leads and collimator blades where the look has them."""
    pad = size // 8
    full = size + 2 * pad
    moving = np.full((full, full), 1.0, np.float32)
    for cells, amp in ((3, 0.12), (6, 0.06), (14, 0.03), (40, 0.02), (110, 0.012)):
        moving += amp * _smooth_noise(rng, full, cells)
    yy, xx = np.mgrid[0:full, 0:full].astype(np.float32)
    cx, cy = heart_xy + pad
    # heart shadow: an ellipse of about 120 x 95 mm around the tree
    ax, ay = 60 / mm_per_px * rng.uniform(0.9, 1.2), 48 / mm_per_px * rng.uniform(0.9, 1.2)
    tilt = np.deg2rad(rng.uniform(-35, 35))
    u = ((xx - cx) * np.cos(tilt) + (yy - cy) * np.sin(tilt)) / ax
    v = (-(xx - cx) * np.sin(tilt) + (yy - cy) * np.cos(tilt)) / ay
    moving += 0.35 * _soft(u * u + v * v < 1, 12 / mm_per_px)
    # diaphragm: a dome below the heart; the liver under it is dense
    dome_x = cx + rng.uniform(-0.3, 0.3) * size
    dome_y = cy + rng.uniform(25, 55) / mm_per_px
    dome = dome_y + (xx - dome_x) ** 2 / (rng.uniform(0.8, 1.4) * full)
    moving += 0.55 * _soft(yy > dome, 6 / mm_per_px)
    # lung: air above the dome lowers attenuation away from the mediastinum
    moving -= 0.25 * _soft((yy < dome) & (np.abs(xx - cx) > ax * 0.9), 25 / mm_per_px)
    # ribs: shallow arcs about 10 mm thick, 25-30 mm apart
    ribs = np.zeros((full, full), np.uint8)
    gap = 27 / mm_per_px
    for k in range(-1, int(full / gap) + 2):
        centre = (int(cx + rng.uniform(-40, 40) / mm_per_px), int(k * gap - full * 0.6))
        axes = (int(full * rng.uniform(0.55, 0.8)), int(full * 0.6))
        cv2.ellipse(ribs, centre, axes, 0, 20, 160, 1, max(2, int(9 / mm_per_px)))
    moving += 0.10 * _soft(ribs.astype(bool), 2.5 / mm_per_px)
    # spine: vertebral bodies about 30 mm wide, 25 mm tall; it sits off-centre in LAO/RAO views
    still = np.zeros((size, size), np.float32)
    sx = size * (0.5 - 0.45 * np.sin(np.deg2rad(primary_deg))) + rng.uniform(-0.05, 0.05) * size
    half = 16 / mm_per_px
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    body = np.abs(xs - sx) < half
    period = 27 / mm_per_px
    discs = np.cos(2 * np.pi * (ys / period + rng.uniform())) > 0.8
    still += 0.3 * _soft(body & ~discs, 4 / mm_per_px)
    still += 0.07 * _soft(np.abs(np.abs(xs - sx) - half * 1.6) < half * 0.25, 4 / mm_per_px)
    if look.wires:  # they ride on the chest: the moving layer
        moving += devices(rng, full, mm_per_px, cx)
    r2 = ((xs - size / 2) ** 2 + (ys - size / 2) ** 2) / (size * size / 2)
    gain = (1.0 - 0.35 * r2).astype(np.float32)
    open_field = collimation(rng, size, look.collimation) if look.collimation > 0 else None
    if open_field is not None:  # lead blades pass about 3 % of the beam, with a soft edge
        gain *= 0.03 + 0.97 * np.clip(_soft(open_field, 1.5 * size / 512), 0.0, 1.0)
    return Background(moving, still, pad, gain, open_field)


def background_at(bg: Background, shift_xy: np.ndarray,
                  pan_xy: np.ndarray | None = None) -> np.ndarray:
    """The body's attenuation with the moving layer shifted by `shift_xy` pixels and the whole
    body (the table panned under the detector) by `pan_xy`."""
    size = bg.still.shape[0]
    pan = np.zeros(2) if pan_xy is None else pan_xy
    m = np.float32([[1, 0, shift_xy[0] + pan[0] - bg.pad], [0, 1, shift_xy[1] + pan[1] - bg.pad]])
    moving = cv2.warpAffine(bg.moving, m, (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REFLECT)
    if pan_xy is None:
        return moving + bg.still
    m = np.float32([[1, 0, pan[0]], [0, 1, pan[1]]])
    return moving + cv2.warpAffine(bg.still, m, (size, size), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT)


@dataclass(frozen=True)
class Detector:
    counts: float  # quanta per pixel at zero attenuation and full gain
    blur_px: float
    gamma: float  # display curve applied in the log domain
    grain_px: float = 0.0  # blur of the noise itself (0: white quantum noise)

    def expose(self, rng: np.random.Generator, attenuation: np.ndarray,
               gain: np.ndarray) -> np.ndarray:
        """Attenuation -> 12-bit log-encoded frame (uint16; vessels dark, as XA is displayed)."""
        signal = self.counts * gain * np.exp(-attenuation)
        signal = cv2.GaussianBlur(signal, (0, 0), self.blur_px)
        counts = rng.poisson(signal).astype(np.float32)
        counts += rng.standard_normal(counts.shape, dtype=np.float32) * (
            ELECTRONIC_NOISE * self.counts)
        if self.grain_px > 0:  # scintillator spread and video compression smooth the grain
            counts = cv2.GaussianBlur(counts, (0, 0), self.grain_px)
        level = np.log(np.maximum(counts, 1.0) / self.counts)  # 0 at zero attenuation
        encoded = np.clip(1.0 + level / LOG_RANGE, 0.0, 1.0) ** self.gamma
        return (encoded * MAX_VALUE + 0.5).astype(np.uint16)


def make_detector(rng: np.random.Generator, size: int, look: Look) -> Detector:
    return Detector(float(np.exp(rng.uniform(*np.log(look.counts_range)))),
                    float(rng.uniform(*BLUR_RANGE_PX) * size / 512),
                    float(rng.uniform(0.9, 1.2)), look.grain_px * size / 512)


def window_8bit(frames: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """12-bit frames -> 8-bit display view with (centre, width) windowing, as DICOM VOI LUT."""
    centre, width = window
    lo = centre - width / 2
    return np.clip((frames.astype(np.float32) - lo) * (255.0 / width) + 0.5, 0, 255).astype(
        np.uint8)
