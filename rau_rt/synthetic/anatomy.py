"""The coronary tree: SYNTAX segment topology with ARCADE's names, template geometry, radii.

A tree is drawn in patient coordinates (millimetres, DICOM LPS: +x patient left, +y posterior,
+z head) with the origin at the heart's centre. Each segment is a 3-D centerline sampled every
`STEP_MM` with a radius per sample; side branches leave their parent part-way along it, the
continuation of a vessel leaves at the parent's end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rau_rt.errors import InputError

# ARCADE's 25 SYNTAX segment names in the order of the Zenodo COCO release (category ids 1-25);
# files are matched by name, never by id (the challenge-phase file shifts ids by one).
SEGMENTS: tuple[str, ...] = (
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "9a", "10", "10a", "11", "12", "12a", "13",
    "14", "14a", "15", "16", "16a", "16b", "16c", "12b", "14b",
)
SEGMENT_TITLES = {
    "1": "RCA proximal", "2": "RCA mid", "3": "RCA distal", "4": "posterior descending (RCA)",
    "5": "left main", "6": "LAD proximal", "7": "LAD mid", "8": "LAD apical",
    "9": "first diagonal", "9a": "first diagonal a", "10": "second diagonal",
    "10a": "second diagonal a", "11": "proximal circumflex", "12": "intermediate/anterolateral",
    "12a": "obtuse marginal a", "13": "distal circumflex", "14": "left posterolateral",
    "14a": "left posterolateral a", "15": "posterior descending (LCx)",
    "16": "posterolateral from RCA", "16a": "posterolateral from RCA a",
    "16b": "posterolateral from RCA b", "16c": "posterolateral from RCA c",
    "12b": "obtuse marginal b", "14b": "left posterolateral b",
}
ARTERIES = ("left", "right")
DOMINANCES = ("right", "left")

STEP_MM = 1.0  # centerline sampling; 3-4 px at 0.25-0.35 mm/px
MIN_DIAMETER_MM = 1.5  # SYNTAX scores lesions only in vessels >= 1.5 mm (syntaxscore.org)


@dataclass(frozen=True)
class SegmentSpec:
    """Template of one segment: where it starts, where it heads, how long and how wide it is."""

    parent: str | None
    attach: tuple[float, float]  # origin as a fraction of the parent's length (1, 1: its end)
    direction: tuple[float, float, float]  # mean heading, LPS
    length_mm: float
    diameter_mm: float  # at its origin; the parent's radius follows by Murray's law


# Topology from ARCADE's tree (1→2→3→{4,16}, 16→{16a,16b,16c}; 5→{6,11,12}, 6→{7,9},
# 7→{8,9a,10}, 8→{10a}, 11→{12a,12b,13}, 13→{14,14a,14b,15}); diameters from Dodge et al. 1992
# (Circulation 86:232: LM 4.5, LAD proximal 3.7, distal 1.9, RCA proximal 3.9 right-dominant);
# branch diameters and lengths are typical adult values, randomized per draw.
TEMPLATE: dict[str, SegmentSpec] = {
    "5": SegmentSpec(None, (0, 0), (0.8, -0.3, -0.2), 10, 4.5),
    "6": SegmentSpec("5", (1, 1), (0.45, -0.55, -0.55), 40, 3.7),
    "7": SegmentSpec("6", (1, 1), (0.3, -0.45, -0.85), 45, 2.8),
    "8": SegmentSpec("7", (1, 1), (0.15, -0.3, -0.95), 40, 1.9),
    "9": SegmentSpec("6", (1, 1), (0.9, -0.2, -0.4), 40, 2.4),
    "9a": SegmentSpec("7", (0.2, 0.5), (0.9, -0.1, -0.45), 28, 1.8),
    "10": SegmentSpec("7", (0.6, 0.9), (0.85, -0.2, -0.5), 35, 2.0),
    "10a": SegmentSpec("8", (0.3, 0.7), (0.8, -0.2, -0.6), 24, 1.6),
    "11": SegmentSpec("5", (1, 1), (0.55, 0.75, -0.35), 30, 3.4),
    "12": SegmentSpec("5", (1, 1), (0.85, 0.1, -0.5), 40, 2.4),
    "12a": SegmentSpec("11", (0.3, 0.6), (0.6, 0.3, -0.75), 40, 2.1),
    "12b": SegmentSpec("11", (0.65, 0.95), (0.45, 0.45, -0.8), 35, 1.9),
    "13": SegmentSpec("11", (1, 1), (0.1, 0.9, -0.45), 30, 2.8),
    "14": SegmentSpec("13", (1, 1), (0.0, 0.6, -0.8), 30, 2.0),
    "14a": SegmentSpec("13", (0.3, 0.6), (0.25, 0.55, -0.8), 25, 1.7),
    "14b": SegmentSpec("13", (0.6, 0.9), (0.3, 0.4, -0.85), 22, 1.6),
    "15": SegmentSpec("13", (1, 1), (-0.3, 0.4, -0.85), 40, 2.2),
    "1": SegmentSpec(None, (0, 0), (-0.75, -0.35, -0.55), 40, 3.9),
    "2": SegmentSpec("1", (1, 1), (-0.25, 0.05, -0.97), 45, 3.5),
    "3": SegmentSpec("2", (1, 1), (0.6, 0.7, -0.35), 40, 3.1),
    "4": SegmentSpec("3", (1, 1), (0.55, -0.1, -0.8), 40, 2.2),
    "16": SegmentSpec("3", (1, 1), (0.85, 0.5, 0.1), 25, 2.4),
    "16a": SegmentSpec("16", (0.2, 0.4), (0.5, 0.3, -0.8), 20, 1.7),
    "16b": SegmentSpec("16", (0.5, 0.7), (0.6, 0.4, -0.7), 20, 1.6),
    "16c": SegmentSpec("16", (0.8, 1.0), (0.6, 0.5, -0.6), 18, 1.6),
}
# Ostia relative to the heart's centre: the left main leaves the left aortic sinus, the RCA the
# right (anterior) sinus, about 25 mm apart across the aortic root.
OSTIUM_MM = {"left": (-5.0, -10.0, 35.0), "right": (-25.0, -20.0, 30.0)}
RIGHT_SEGMENTS = frozenset({"1", "2", "3", "4", "16", "16a", "16b", "16c"})
# Left-dominant: the LCx gives the PDA (15) and the RCA stops before the crux
# (syntaxscore.org definitions); right-dominant: the RCA gives 4 and 16, there is no 15.
ABSENT = {"right": frozenset({"15"}), "left": frozenset({"4", "16", "16a", "16b", "16c"})}
# Dodge 1992: proximal RCA 3.9 mm right-dominant, 2.8 mm left-dominant (mid and distal RCA
# scaled by the same 0.72 here), LCx 3.4-4.2 mm, the larger when it is dominant.
DOMINANCE_DIAMETER_MM = {"left": {"1": 2.8, "2": 2.5, "3": 2.2, "11": 4.0, "13": 3.2},
                         "right": {}}


def segments_of(artery: str, dominance: str) -> tuple[str, ...]:
    """The labelled segments an injection of `artery` shows, in ARCADE order."""
    check_choice("artery", artery, ARTERIES)
    check_choice("dominance", dominance, DOMINANCES)
    side = RIGHT_SEGMENTS if artery == "right" else frozenset(SEGMENTS) - RIGHT_SEGMENTS
    return tuple(s for s in SEGMENTS if s in side and s not in ABSENT[dominance])


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def check_segments(names: tuple[str, ...], artery: str, dominance: str) -> tuple[str, ...]:
    """Validate requested segment names against ARCADE's names and this tree; keep ARCADE order."""
    available = segments_of(artery, dominance)
    for name in names:
        if name not in SEGMENTS:
            raise InputError(f"segment {name!r}: expected one of ARCADE's names "
                             f"{', '.join(SEGMENTS)}")
        if name not in available:
            raise InputError(f"segment {name!r} is not in a {dominance}-dominant {artery} "
                             f"coronary tree; valid: {', '.join(available)}")
    if not names:
        raise InputError(f"segments: expected at least one of {', '.join(available)}")
    return tuple(s for s in available if s in names)


@dataclass(frozen=True)
class Stenosis:
    """A focal narrowing: `reduction` of the radius (0.25-0.99) over `length_mm` (3-20)."""

    segment: str
    position: float  # centre, as a fraction of the segment's length
    reduction: float
    length_mm: float


@dataclass(frozen=True)
class Vessel:
    """One drawn centerline: a labelled segment, or an unlabelled twig (`name` None)."""

    name: str | None
    points: np.ndarray  # (n, 3) float64, mm, LPS
    radii: np.ndarray  # (n,) float64, mm
    path_mm: np.ndarray  # (n,) distance from the ostium along the tree, for contrast arrival


@dataclass(frozen=True)
class Tree:
    artery: str
    dominance: str
    vessels: tuple[Vessel, ...]  # labelled segments first, in ARCADE order, then twigs
    stenoses: tuple[Stenosis, ...]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _centerline(rng: np.random.Generator, start: np.ndarray, heading: np.ndarray,
                entry: np.ndarray | None, length: float, tortuosity: float) -> np.ndarray:
    """A smooth wandering 3-D path: the heading plus two sinusoids across it."""
    n = max(3, round(length / STEP_MM) + 1)
    s = np.linspace(0.0, 1.0, n)[:, None]
    a = _unit(np.cross(heading, [0.0, 0.0, 1.0] if abs(heading[2]) < 0.9 else [1.0, 0, 0]))
    b = np.cross(heading, a)
    waves = rng.uniform(0.7, 2.2, 2)  # wiggles per segment
    phases = rng.uniform(0, 2 * np.pi, 2)
    dirs = (heading[None, :]
            + tortuosity * np.sin(2 * np.pi * waves[0] * s + phases[0]) * a
            + tortuosity * np.sin(2 * np.pi * waves[1] * s + phases[1]) * b)
    if entry is not None:  # bend smoothly out of the parent's heading over the first half
        blend = np.clip(s / 0.5, 0.0, 1.0)
        blend = blend * blend * (3 - 2 * blend)
        dirs = (1 - blend) * entry + blend * dirs
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    steps = dirs * (length / (n - 1))
    return start + np.vstack([np.zeros(3), np.cumsum(steps[:-1], axis=0)])


def _narrow(radii: np.ndarray, stenosis: Stenosis) -> np.ndarray:
    n = len(radii)
    s = np.arange(n) * STEP_MM
    centre = stenosis.position * (n - 1) * STEP_MM
    # a cosine-shaped lesion: full reduction at its centre, none at its ends
    half = stenosis.length_mm / 2
    shape = np.where(np.abs(s - centre) < half, 0.5 + 0.5 * np.cos(np.pi * (s - centre) / half), 0)
    return radii * (1 - stenosis.reduction * shape)


def build_tree(rng: np.random.Generator, artery: str, dominance: str, stenoses: int = 0,
               twigs_per_25mm: float = 1.0) -> Tree:
    """Draw one patient's tree: lengths, headings, tortuosity and radii randomized around
    TEMPLATE; radii follow Murray's law (r_parent³ = Σ r_child³) at every branch point."""
    names = segments_of(artery, dominance)
    size = rng.normal(1.0, 0.08)  # patient scale (Dodge: about 10 % between patients)
    tortuosity = rng.uniform(0.1, 0.45)
    diameters = {n: DOMINANCE_DIAMETER_MM[dominance].get(n, TEMPLATE[n].diameter_mm)
                 for n in names}
    chosen = sorted(rng.choice(len(names), size=min(stenoses, len(names)), replace=False))
    lesions = tuple(Stenosis(names[i], float(rng.uniform(0.3, 0.7)),
                             float(rng.uniform(0.25, 0.99)), float(rng.uniform(3, 20)))
                    for i in chosen)

    points: dict[str, np.ndarray] = {}
    origin: dict[str, int] = {}  # sample of the parent where a segment leaves it
    path: dict[str, np.ndarray] = {}
    for name in names:  # ARCADE's order lists every parent before its children
        spec = TEMPLATE[name]
        heading = _unit(np.asarray(spec.direction) + rng.normal(0, 0.18, 3))
        length = spec.length_mm * size * rng.uniform(0.8, 1.25)
        if spec.parent is None:
            start, entry, p0 = np.asarray(OSTIUM_MM[artery]), None, 0.0
        else:
            parent = points[spec.parent]
            k = round(rng.uniform(*spec.attach) * (len(parent) - 1))
            origin[name] = k = min(max(k, 1), len(parent) - 1)
            start, entry, p0 = parent[k], _unit(parent[k] - parent[k - 1]), path[spec.parent][k]
        points[name] = _centerline(rng, start, heading, entry, length, tortuosity)
        path[name] = p0 + np.arange(len(points[name])) * (length / (len(points[name]) - 1))

    # Radii, distal first: each segment starts at its Dodge radius; where children leave, the
    # radius obeys Murray's law, r³ upstream = r³ downstream + Σ r³ of the branches leaving.
    start_r = {n: diameters[n] / 2 * size * rng.uniform(0.93, 1.07) for n in names}
    radii: dict[str, np.ndarray] = {}
    for name in reversed(names):
        n = len(points[name])
        children = [c for c in names if TEMPLATE[c].parent == name]
        at_end = [c for c in children if origin[c] == n - 1]
        # children are done (reverse ARCADE order): use the radii they actually start with
        end = (sum(radii[c][0] ** 3 for c in at_end) ** (1 / 3) if at_end
               else start_r[name] * (0.9 if children else 0.65))
        leaving = np.zeros(n)  # Σ r³ of the side branches leaving downstream of each sample
        for c in children:
            if origin[c] < n - 1:
                leaving[:origin[c]] += radii[c][0] ** 3
        # the trunk's own taper is chosen so that the segment starts at its Dodge radius
        trunk0 = max(start_r[name] ** 3 - leaving[0], end ** 3) ** (1 / 3)
        trunk = np.linspace(trunk0, end, n)
        radii[name] = np.maximum((trunk ** 3 + leaving) ** (1 / 3), MIN_DIAMETER_MM / 2 * 0.8)
    for lesion in lesions:
        radii[lesion.segment] = _narrow(radii[lesion.segment], lesion)

    vessels = [Vessel(n, points[n], radii[n], path[n]) for n in names]
    if twigs_per_25mm > 0:  # septal/marginal twigs below the SYNTAX size: unlabelled clutter
        for name in names:
            pts = points[name]
            for _ in range(rng.poisson(len(pts) * twigs_per_25mm / 25)):
                k = int(rng.integers(1, len(pts)))
                heading = _unit(rng.normal(0, 1, 3) + np.array([0.0, 0.0, -0.8]))
                length = rng.uniform(6, 18)
                twig = _centerline(rng, pts[k], heading, None, length, tortuosity)
                r = np.linspace(rng.uniform(0.35, 0.6), 0.25, len(twig))
                vessels.append(Vessel(None, twig, r, path[name][k] + np.arange(len(twig))))
    return Tree(artery, dominance, tuple(vessels), lesions)
