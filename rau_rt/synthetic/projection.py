"""C-arm geometry: standard angiographic views and the cone-beam projection of the tree."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rau_rt.errors import InputError

# C-arm geometry (typical cardiac systems): source-to-image 1000-1200 mm, source-to-patient
# (isocentre) 700-800 mm, so a magnification of 1.3-1.6 at the isocentre.
SOURCE_TO_DETECTOR_MM = 1100.0
SOURCE_TO_PATIENT_MM = 750.0
# Pixel size at the isocentre for a 512² image: a 17-25 cm field of view (data_and_scale.md §2.2).
PIXEL_SPACING_512_MM = (0.25, 0.35)
# Standard coronary views: primary LAO(+)/RAO(-) 30-45°, secondary CRA(+)/CAU(-) 20-30°.
PRIMARY_RANGE_DEG = (30.0, 45.0)
SECONDARY_RANGE_DEG = (20.0, 30.0)
MAX_PRIMARY_DEG = 90.0
MAX_SECONDARY_DEG = 45.0


@dataclass(frozen=True)
class View:
    """A C-arm angulation, in DICOM's convention: PositionerPrimaryAngle (+LAO / -RAO) and
    PositionerSecondaryAngle (+CRA / -CAU), degrees."""

    primary_deg: float
    secondary_deg: float

    def __post_init__(self) -> None:
        if not -MAX_PRIMARY_DEG <= self.primary_deg <= MAX_PRIMARY_DEG:
            raise InputError(f"view primary angle: expected -{MAX_PRIMARY_DEG:g}.."
                             f"{MAX_PRIMARY_DEG:g} degrees (RAO-/LAO+), got {self.primary_deg}")
        if not -MAX_SECONDARY_DEG <= self.secondary_deg <= MAX_SECONDARY_DEG:
            raise InputError(f"view secondary angle: expected -{MAX_SECONDARY_DEG:g}.."
                             f"{MAX_SECONDARY_DEG:g} degrees (CAU-/CRA+), got {self.secondary_deg}")

    @property
    def name(self) -> str:
        """Clinical name, e.g. "LAO 40 CRA 25"."""
        p = f"{'LAO' if self.primary_deg >= 0 else 'RAO'} {abs(self.primary_deg):.0f}"
        return f"{p} {'CRA' if self.secondary_deg >= 0 else 'CAU'} {abs(self.secondary_deg):.0f}"

    @classmethod
    def parse(cls, text: str) -> View:
        """"PRIMARY,SECONDARY" in degrees, e.g. "-30,25" for RAO 30 CRA 25."""
        try:
            primary, secondary = (float(x) for x in text.split(","))
        except ValueError:
            raise InputError(f"view: expected PRIMARY,SECONDARY degrees such as -30,25, got "
                             f"{text!r}") from None
        return cls(primary, secondary)


def random_view(rng: np.random.Generator, avoid: View | None = None) -> View:
    """A standard view with random sides and angles; at least 20° from `avoid` on some axis."""
    while True:
        view = View(float(rng.choice([-1, 1]) * rng.uniform(*PRIMARY_RANGE_DEG)),
                    float(rng.choice([-1, 1]) * rng.uniform(*SECONDARY_RANGE_DEG)))
        if avoid is None or max(abs(view.primary_deg - avoid.primary_deg),
                                abs(view.secondary_deg - avoid.secondary_deg)) >= 20:
            return view


def rotation(view: View) -> np.ndarray:
    """Patient (LPS) -> detector axes (u right, v down, w toward the source)."""
    a, b = np.deg2rad(view.primary_deg), np.deg2rad(view.secondary_deg)
    # AP view: image right = patient left, image down = feet, toward the source = posterior.
    ap = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    # LAO swings the detector toward the patient's left (about the head-foot axis), CRA toward
    # the head (about the left-right axis).
    ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
    about_z = np.array([[ca, sa, 0], [-sa, ca, 0], [0, 0, 1.0]])
    about_x = np.array([[1.0, 0, 0], [0, cb, -sb], [0, sb, cb]])
    return ap @ about_x @ about_z


@dataclass(frozen=True)
class Projector:
    """Cone-beam projection onto a `size`² image, `spacing_mm` per pixel at the isocentre."""

    view: View
    size: int
    spacing_mm: float
    center_px: tuple[float, float]  # where the isocentre lands, (x, y)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, 3) mm -> pixel (n, 2) (x, y), magnification relative to the isocentre (n,),
        depth toward the source (n,) mm."""
        uvw = points @ rotation(self.view).T
        # a point nearer the source (w > 0) is magnified more: SOD / (SOD - w)
        mag = SOURCE_TO_PATIENT_MM / (SOURCE_TO_PATIENT_MM - uvw[:, 2])
        xy = uvw[:, :2] * (mag / self.spacing_mm)[:, None] + np.asarray(self.center_px)
        return xy, mag, uvw[:, 2]

    @property
    def pixel_spacing_detector_mm(self) -> float:
        """ImagerPixelSpacing: the pixel size at the detector plane."""
        return self.spacing_mm * SOURCE_TO_DETECTOR_MM / SOURCE_TO_PATIENT_MM


def fit_projector(rng: np.random.Generator, view: View, size: int, points: np.ndarray,
                  margin_px: float) -> Projector:
    """Choose the pixel size (0.25-0.35 mm at 512²) and the centre so the tree, grown by
    `margin_px` of motion, fits inside the image where it can."""
    spacing = rng.uniform(*PIXEL_SPACING_512_MM) * 512 / size
    probe = Projector(view, size, spacing, (0.0, 0.0))
    xy, _, _ = probe.project(points)
    extent = xy.max(axis=0) - xy.min(axis=0)
    room = max(size - 2 * margin_px, 0.3 * size)  # big motion on small frames: best effort
    widest = PIXEL_SPACING_512_MM[1] * 512 / size
    if extent.max() > room:  # zoom out as far as the field of view allows
        spacing = min(widest, spacing * extent.max() / room)
        probe = Projector(view, size, spacing, (0.0, 0.0))
        xy, _, _ = probe.project(points)
        extent = xy.max(axis=0) - xy.min(axis=0)
    slack = np.maximum(size - extent, 0) * 0.15
    centre = size / 2 - (xy.max(axis=0) + xy.min(axis=0)) / 2 + rng.uniform(-slack, slack)
    return Projector(view, size, float(spacing), (float(centre[0]), float(centre[1])))
