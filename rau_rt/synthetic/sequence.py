"""`generate_sequence` and `make_reference`: cine frames with exact per-segment ground truth."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np

from rau_rt.errors import InputError
from rau_rt.geometry import box_from_mask
from rau_rt.synthetic import render
from rau_rt.synthetic.anatomy import (
    ARTERIES,
    DOMINANCES,
    SEGMENTS,
    Stenosis,
    Tree,
    build_tree,
    check_choice,
    check_segments,
    segments_of,
)
from rau_rt.synthetic.dynamics import (
    OPACIFIED,
    PRESENT_FRACTION,
    Bolus,
    Motion,
    MotionField,
    cardiac_phase_weight,
    make_bolus,
    make_motion_field,
    respiratory_weight,
)
from rau_rt.synthetic.look import Pan, look_named, make_pan
from rau_rt.synthetic.projection import Projector, View, fit_projector, random_view
from rau_rt.types import Region

SIZE_MULTIPLE = 16  # SAM2 and the VLMs patchify by 16
SIZE_RANGE = (64, 2048)
MAX_STENOSES = 4
CONTRAST_DELAY_S = 0.4  # frames before the injection reaches the ostium
_SEQUENCE, _REFERENCE = 0, 1  # random streams: a reference is never the target's draw


@dataclass(frozen=True)
class SequenceConfig:
    """Everything that determines a sequence; equal configs give identical frames."""

    seed: int = 0
    frames: int = 64
    size: int = 512
    fps: float = 15.0
    view: View | None = None  # None: a random standard view
    artery: str = "left"  # which coronary is injected
    dominance: str = "right"
    motion: Motion = field(default_factory=Motion)
    segments: tuple[str, ...] | None = None  # None: every segment of the tree
    stenoses: int = 0
    contrast_delay_frames: int | None = None  # None: about 0.4 s, at least 2 frames
    catheter: bool = True
    look: str = "clinical"  # a LOOKS name: "clinical" (toward real cines) or "classic"

    def __post_init__(self) -> None:
        look_named(self.look)
        if self.frames < 1:
            raise InputError(f"frames: expected >= 1, got {self.frames}")
        if self.size % SIZE_MULTIPLE or not SIZE_RANGE[0] <= self.size <= SIZE_RANGE[1]:
            raise InputError(f"size: expected a multiple of {SIZE_MULTIPLE} in "
                             f"{SIZE_RANGE[0]}..{SIZE_RANGE[1]}, got {self.size}")
        if not self.fps > 0:
            raise InputError(f"fps: expected > 0 (7.5, 15 or 30 in practice), got {self.fps}")
        check_choice("artery", self.artery, ARTERIES)
        check_choice("dominance", self.dominance, DOMINANCES)
        if self.segments is not None:
            check_segments(tuple(self.segments), self.artery, self.dominance)
        if not 0 <= self.stenoses <= MAX_STENOSES:
            raise InputError(f"stenoses: expected 0..{MAX_STENOSES}, got {self.stenoses}")
        if self.contrast_delay_frames is not None and self.contrast_delay_frames < 1:
            raise InputError("contrast_delay_frames: expected >= 1 (the first frames have no "
                             f"contrast), got {self.contrast_delay_frames}")

    @property
    def chosen_segments(self) -> tuple[str, ...]:
        available = segments_of(self.artery, self.dominance)
        if self.segments is None:
            return available
        return check_segments(tuple(self.segments), self.artery, self.dominance)

    @property
    def delay_frames(self) -> int:
        if self.contrast_delay_frames is not None:
            return self.contrast_delay_frames
        return max(2, round(CONTRAST_DELAY_S * self.fps))


@dataclass(frozen=True)
class SegmentTruth:
    """One segment in one frame. The mask is the opacified lumen (stored as a crop)."""

    name: str
    crop: np.ndarray  # bool
    origin: tuple[int, int]  # (x, y) of crop[0, 0] in the frame
    box: tuple[int, int, int, int] | None  # from the mask; x2/y2 exclusive; None when empty
    centerline: np.ndarray  # (n, 2) float32 pixel (x, y), proximal to distal; may leave frame
    opacified_fraction: float  # of centerline samples at >= half contrast
    present: bool  # opacified_fraction >= PRESENT_FRACTION

    def mask(self, size: int) -> np.ndarray:
        """The full-frame bool mask."""
        full = np.zeros((size, size), bool)
        x, y = self.origin
        h, w = self.crop.shape
        full[y:y + h, x:x + w] = self.crop
        return full


@dataclass(frozen=True)
class FrameTruth:
    index: int
    time_s: float
    segments: dict[str, SegmentTruth]
    labels: np.ndarray  # uint8: ARCADE category id (SEGMENTS index + 1) nearest the detector
    contraction: float = 0.0  # cardiac phase: 0 end-diastole .. 1 end-systole


@dataclass(frozen=True)
class SequenceMeta:
    config: SequenceConfig
    view: View
    segments: tuple[str, ...]
    pixel_spacing_mm: float  # at the isocentre
    imager_pixel_spacing_mm: float  # at the detector (DICOM ImagerPixelSpacing)
    window: tuple[float, float]  # (centre, width) for the 8-bit view
    contrast_start_frame: int  # first frame with any iodine in the tree
    stenoses: tuple[Stenosis, ...]
    diameters_mm: dict[str, float]  # per chosen segment: mean lumen diameter (calibre)


@dataclass(frozen=True)
class Sequence:
    frames: np.ndarray  # (frames, size, size) uint16, 12 bits used
    truth: tuple[FrameTruth, ...]
    meta: SequenceMeta

    def frames_8bit(self) -> np.ndarray:
        return render.window_8bit(self.frames, self.meta.window)


@dataclass(frozen=True)
class Reference:
    image: np.ndarray  # (size, size) uint16
    view: View
    window: tuple[float, float]
    regions: tuple[Region, ...]

    def image_8bit(self) -> np.ndarray:
        return render.window_8bit(self.image, self.window)


@dataclass(frozen=True)
class _Scene:
    tree: Tree
    projector: Projector
    rest: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]  # per vessel: xy, mag, depth
    motion: MotionField
    bolus: Bolus
    background: render.Background
    detector: render.Detector
    catheter: np.ndarray | None  # (n, 2) rest pixel path, tip first
    iodine_per_mm: float  # attenuation of opacified blood (MU_IODINE_PER_MM x the look's gain)
    pan: Pan | None


def _catheter_path(rng: np.random.Generator, ostium: np.ndarray, first: np.ndarray,
                   size: int, mm_per_px: float) -> np.ndarray:
    """A Judkins-like curve: back out of the ostium, up over the aortic root, down the
    descending aorta and off the bottom of the image."""
    back = ostium - first
    back /= np.linalg.norm(back) + 1e-9
    mm = 1.0 / mm_per_px
    apex = ostium + back * 10 * mm + np.array([rng.uniform(-15, 15), -rng.uniform(30, 45)]) * mm
    side = rng.choice([-1, 1])
    descend_x = np.clip(ostium[0] + side * rng.uniform(15, 45) * mm, 0.1 * size, 0.9 * size)
    points = np.array([ostium, ostium + back * 6 * mm, apex,
                       [descend_x, apex[1] + 20 * mm], [descend_x, size * 0.6],
                       [descend_x + rng.uniform(-10, 10) * mm, size + 30 * mm]])
    # Catmull-Rom through the control points, about one sample per 2 mm
    padded = np.vstack([points[0], points, points[-1]])
    out = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1:i + 3]
        n = max(2, int(np.linalg.norm(p2 - p1) / (2 * mm)))
        s = np.linspace(0, 1, n, endpoint=False)[:, None]
        out.append(0.5 * (2 * p1 + (p2 - p0) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s ** 2
                          + (3 * p1 - p0 - 3 * p2 + p3) * s ** 3))
    return np.vstack([*out, points[-1:]])


def _scene(rng: np.random.Generator, cfg: SequenceConfig, view: View,
           bolus_start_s: float) -> _Scene:
    look = look_named(cfg.look)
    tree = build_tree(rng, cfg.artery, cfg.dominance, cfg.stenoses, look.twigs_per_25mm)
    labelled = np.vstack([v.points for v in tree.vessels if v.name is not None])
    margin = (cfg.motion.cardiac_px + cfg.motion.respiratory_px
              + (12 + look.pan_px) * cfg.size / 512)
    projector = fit_projector(rng, view, cfg.size, labelled, margin)
    rest = tuple(projector.project(v.points) for v in tree.vessels)
    rest_xy = np.vstack([r[0] for r, v in zip(rest, tree.vessels, strict=True) if v.name])
    motion = make_motion_field(rng, cfg.motion, rest_xy)
    longest = max(float(v.path_mm[-1]) for v in tree.vessels if v.name is not None)
    bolus = make_bolus(rng, bolus_start_s, longest, cfg.motion.heart_rate_bpm)
    centre = (rest_xy.min(axis=0) + rest_xy.max(axis=0)) / 2
    background = render.make_background(rng, cfg.size, centre, view.primary_deg,
                                        projector.spacing_mm, look)
    detector = render.make_detector(rng, cfg.size, look)
    catheter = None
    if cfg.catheter:
        root_xy = rest[0][0]
        catheter = _catheter_path(rng, root_xy[0], root_xy[min(3, len(root_xy) - 1)], cfg.size,
                                  projector.spacing_mm)
    return _Scene(tree, projector, rest, motion, bolus, background, detector, catheter,
                  render.MU_IODINE_PER_MM * look.iodine_gain, make_pan(rng, look, cfg.size))


def _render(scene: _Scene, cfg: SequenceConfig, segments: tuple[str, ...], index: int,
            t: float, noise: np.random.Generator) -> tuple[np.ndarray, FrameTruth]:
    size = cfg.size
    motion = scene.motion
    drift = (respiratory_weight(np.array(t), motion.respiratory_phase0)
             * cfg.motion.respiratory_px * motion.drift)
    pan = scene.pan.at(t) if scene.pan is not None else np.zeros(2)
    vessels = np.zeros((size, size), np.float32)
    labels = np.zeros((size, size), np.uint8)
    depth_buffer = np.full((size, size), np.inf, np.float32)
    truths: dict[str, SegmentTruth] = {}
    spacing = scene.projector.spacing_mm
    open_field = scene.background.open_field
    for vessel, (xy0, mag, depth) in zip(scene.tree.vessels, scene.rest, strict=True):
        xy = xy0 + motion.displacement(xy0, t) + pan
        opacity = scene.bolus.opacity(vessel.path_mm, t)
        raster = None
        if opacity.max() > 0:
            tube = render.Tube(xy, vessel.radii, spacing / mag, scene.iodine_per_mm * opacity)
            raster = render.rasterize(tube, size)
            if raster is not None:
                render.composite(vessels, raster)
        if vessel.name not in segments:
            continue
        seen = opacity >= OPACIFIED
        if open_field is not None:  # nothing shows under a collimator blade
            seen = seen & _in_field(open_field, xy)
        fraction = float(np.mean(seen))
        crop, origin = np.zeros((0, 0), bool), (0, 0)
        if raster is not None:
            crop = raster.inside & (opacity[raster.sample] >= OPACIFIED)
            origin = raster.origin
            x0, y0 = origin
            h, w = crop.shape
            if open_field is not None:
                crop = crop & open_field[y0:y0 + h, x0:x0 + w]
            z = depth_buffer[y0:y0 + h, x0:x0 + w]
            front = crop & (depth[raster.sample] < z)
            z[front] = depth[raster.sample][front]
            labels[y0:y0 + h, x0:x0 + w][front] = SEGMENTS.index(vessel.name) + 1
        truths[vessel.name] = SegmentTruth(
            vessel.name, crop, origin, box_from_mask(crop, origin) if crop.size else None,
            xy.astype(np.float32), fraction, fraction >= PRESENT_FRACTION)
    attenuation = render.background_at(scene.background, drift,
                                       pan if scene.pan is not None else None) + vessels
    if scene.catheter is not None:
        tip = scene.catheter[0]
        tip_shift = motion.displacement(tip[None, :], t)[0]
        along = np.linspace(0.0, 1.0, len(scene.catheter))[:, None]
        follow = np.clip(1.0 - along / 0.4, 0.0, 1.0)  # the tip rides the heart, the shaft not
        xy = scene.catheter + follow * tip_shift + (1 - follow) * 0.5 * drift + pan
        n = len(xy)
        iodine = scene.iodine_per_mm * 2.0 if scene.bolus.injecting(t) else 0.0
        tube = render.Tube(xy, np.full(n, render.CATHETER_INNER_RADIUS_MM),
                           np.full(n, spacing), np.full(n, iodine))
        raster = render.rasterize(tube, size, np.full(n, render.CATHETER_OUTER_RADIUS_MM))
        if raster is not None:
            x0, y0 = raster.origin
            h, w = raster.attenuation.shape
            attenuation[y0:y0 + h, x0:x0 + w] += raster.attenuation
    frame = scene.detector.expose(noise, attenuation, scene.background.gain)
    contraction = float(cardiac_phase_weight(np.array([t]), cfg.motion.heart_rate_bpm,
                                             motion.cardiac_phase0)[0])
    return frame, FrameTruth(index, t, truths, labels, contraction)


def _in_field(open_field: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Per centerline sample: inside the image and the collimated field."""
    size = open_field.shape[0]
    ij = np.round(xy).astype(int)
    inside = (ij >= 0).all(axis=1) & (ij < size).all(axis=1)
    out = np.zeros(len(xy), bool)
    out[inside] = open_field[ij[inside, 1], ij[inside, 0]]
    return out


def _window(frame: np.ndarray, look: str) -> tuple[float, float]:
    lo, hi = np.percentile(frame, [0.5, 99.8])
    below, above = look_named(look).window_room  # room below for the contrast to come
    lo, hi = lo - below * (hi - lo), hi + above * (hi - lo)
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))


def generate_sequence(seed: int = 0, frames: int = 64, size: int = 512, fps: float = 15.0,
                      view: View | None = None, dominance: str = "right",
                      motion: Motion | None = None, *, artery: str = "left",
                      segments: tuple[str, ...] | None = None, stenoses: int = 0,
                      contrast_delay_frames: int | None = None, catheter: bool = True,
                      look: str = "clinical",
                      progress: Callable[[int], None] | None = None) -> Sequence:
    """A cine run: empty frames, the bolus filling the tree, plateau and washout.

    Deterministic for equal arguments. `motion` None takes the look's motion (`LOOKS`).
    `progress` is called with 1 after every frame.
    Raises InputError (a ValueError) naming the valid range of a bad argument.
    """
    cfg = sequence_config(seed, frames, size, fps, view, dominance, motion, artery=artery,
                          segments=segments, stenoses=stenoses,
                          contrast_delay_frames=contrast_delay_frames, catheter=catheter,
                          look=look)
    return render_frames(cfg, range(frames), progress)


def sequence_config(seed: int = 0, frames: int = 64, size: int = 512, fps: float = 15.0,
                    view: View | None = None, dominance: str = "right",
                    motion: Motion | None = None, *, artery: str = "left",
                    segments: tuple[str, ...] | None = None, stenoses: int = 0,
                    contrast_delay_frames: int | None = None, catheter: bool = True,
                    look: str = "clinical") -> SequenceConfig:
    """The config `generate_sequence` renders for these arguments (for `SequenceStream`)."""
    return SequenceConfig(seed, frames, size, fps, view, artery, dominance,
                          motion if motion is not None else look_named(look).motion, segments,
                          stenoses, contrast_delay_frames, catheter, look)


class SequenceStream:
    """Frames `indices` of the run `cfg` describes, rendered one at a time as they are iterated
    (a `synthetic:` source's first frame is ready after one frame's work, not the whole run's).

    `meta` is known on construction (its window comes from the first frame, rendered then).
    Iterating yields (image, truth) pairs equal to `render_frames(cfg, indices)`'s; the noise is
    drawn frame by frame, so a stream can be iterated once.
    """

    def __init__(self, cfg: SequenceConfig, indices: Iterable[int] | None = None) -> None:
        indices = list(range(cfg.frames) if indices is None else indices)
        if not indices or indices != sorted(set(indices)) or not 0 <= indices[0] \
                <= indices[-1] < cfg.frames:
            raise InputError(f"indices: expected ascending distinct frames in "
                             f"0..{cfg.frames - 1}, got {indices[:8]}")
        rng = np.random.default_rng([cfg.seed, _SEQUENCE])
        self._noise = np.random.default_rng([cfg.seed, _SEQUENCE, 1])
        self._chosen = cfg.chosen_segments
        view = cfg.view if cfg.view is not None else random_view(rng)
        self._scene = scene = _scene(rng, cfg, view, cfg.delay_frames / cfg.fps)
        self._cfg, self._indices = cfg, indices
        self._first: tuple[np.ndarray, FrameTruth] | None = self._render(indices[0])
        self.meta = SequenceMeta(cfg, view, self._chosen, scene.projector.spacing_mm,
                                 scene.projector.pixel_spacing_detector_mm,
                                 _window(self._first[0], cfg.look),
                                 min(cfg.delay_frames, cfg.frames), scene.tree.stenoses,
                                 {v.name: float(2 * np.mean(v.radii))
                                  for v in scene.tree.vessels if v.name in self._chosen})

    def __len__(self) -> int:
        return len(self._indices)

    def _render(self, k: int) -> tuple[np.ndarray, FrameTruth]:
        return _render(self._scene, self._cfg, self._chosen, k, k / self._cfg.fps, self._noise)

    def __iter__(self):
        if self._first is None:
            raise RuntimeError("a SequenceStream is iterated once (its noise is drawn as it "
                               "goes); make another for a second pass")
        first, self._first = self._first, None
        yield first
        for k in self._indices[1:]:
            yield self._render(k)


def render_frames(cfg: SequenceConfig, indices: Iterable[int],
                  progress: Callable[[int], None] | None = None) -> Sequence:
    """Frames `indices` (ascending, each < cfg.frames) of the run `cfg` describes.

    The scene (patient, view, motion, bolus) and the truth are those of `generate_sequence`
    with the same config; the noise differs unless `indices` is every frame from 0 (one noise
    stream is drawn frame by frame). `Sequence.truth[i].index` is the frame index; the window
    is taken from the first frame rendered. Training draws short clips this way.
    """
    stream = SequenceStream(cfg, indices)
    images = np.empty((len(stream), cfg.size, cfg.size), np.uint16)
    truths = []
    for i, (image, truth) in enumerate(stream):
        images[i] = image
        truths.append(truth)
        if progress is not None:
            progress(1)
    return Sequence(images, tuple(truths), stream.meta)


def polygon_of(mask: np.ndarray) -> tuple[tuple[float, float], ...] | None:
    """The outline of a mask's largest connected part, as (x, y) pixel vertices."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    return tuple((float(x), float(y)) for x, y in largest[:, 0, :])


def make_reference(seed: int = 0, size: int = 512, *, artery: str = "left",
                   dominance: str = "right", segments: tuple[str, ...] | None = None,
                   avoid_view: View | None = None, look: str = "clinical") -> Reference:
    """A contrast-filled still of another patient (another tree draw) in another view, with a
    box and a polygon for each chosen segment.

    `avoid_view`: the target's view; the reference's differs by at least 20° on some axis.
    """
    cfg = SequenceConfig(seed, 1, size, 15.0, None, artery, dominance, Motion(0.0, 0.0),
                         segments, 0, None, True, look)
    chosen = cfg.chosen_segments
    rng = np.random.default_rng([seed, _REFERENCE])
    for _ in range(8):  # a view where every chosen segment shows; the first almost always does
        view = random_view(rng, avoid_view)
        scene = _scene(rng, cfg, view, -60.0)  # injected long ago: filled, not washed out
        scene = _Scene(scene.tree, scene.projector, scene.rest, scene.motion,
                       Bolus(-60.0, scene.bolus.speed_mm_s, 1e9), scene.background,
                       scene.detector, scene.catheter, scene.iodine_per_mm, None)
        image, truth = _render(scene, cfg, chosen, 0, 0.0, np.random.default_rng([seed, 1, 1]))
        if all(truth.segments[n].box is not None for n in chosen):
            break
    else:
        raise InputError(f"make_reference: segments {chosen} never all showed in 8 views")
    regions = tuple(Region(n, truth.segments[n].box, polygon_of(truth.segments[n].mask(size)))
                    for n in chosen)
    return Reference(image, view, _window(image, look), regions)
