"""Task accuracy of the trained demo models against exact synthetic truth.

    python -m benchmarks.bench_accuracy [--suite tracker|frames|localizer|pipeline] [--quick]
        [--weights FILE [--config micro|mini]] [--vlm-weights FILE] [--json PATH]

The `localizer` and `pipeline` suites (the trained VLM alone, and its keyframe boxes
prompting the trained SAM2) are described in `benchmarks/accuracy_vlm.py`; the `tracker`
suite (the default) is this module's:

Held-out cines (generator seeds in `rau_rt.train.HELD_OUT_SEEDS`, never trained on; both
arteries and dominances, random views, 0-2 stenoses, the clinical and classic looks; 60 frames
at 15 fps, 512²), four segments each (the two widest, a middle and the narrowest calibre), scored
per segment and frame with `rau_rt.synthetic.scoring` (Dice, boundary F at 2 px, presence; by
calibre and cardiac phase). Three prompt regimes:

- `mask`: the truth masks on the first frame where all four segments show (the tracker's
  `add_reference` on that frame), tracking only after it;
- `box`: jittered truth boxes on that frame and again every 15 frames (what the VLM's keyframes
  do; a segment not visible on a keyframe gets no box, as the VLM answers null);
- `reference`: another patient's annotated reference in another view as pinned memory from the
  first frame (before any contrast), plus one jittered box where the segments first show.

Rows: the Tracker on the exported bundle in fp32, with every graph int8 (`int8`, exported with
`--no-precision-gate`) and with the exporter's per-graph choice (`int8-gated`: graphs whose
drift is over `export/verify.py`'s tolerance stay fp32; the row is left out when it is every
graph int8 anyway, and the record says so), and sam2's `SAM2VideoPredictor` on the same
weights, frames (JPEG, as it reads them) and prompts (the baseline of `speedup`; a re-prompt is
added before propagation reaches its frame, so it too is decoded without memory). Hole filling
is off on both sides (a pip-installed sam2 has no `sam2._C`). Each tracker row's `fidelity`
holds its per-frame mask IoU against the predictor; the fp32 row's also holds it for the
tracker run as sam2 runs (`same_input`): fed the predictor's own preprocessed frames (PIL's
bicubic resize instead of `ops.preprocess`'s bilinear one) and keeping every conditioning frame
(sam2 attends all of them; a 60-frame cine has at most 4 keyframes, `MAX_CONDITIONING`, where
the default tracker keeps the first and the newest). The gap between the two IoUs is the
resize's and the memory bound's; the `same_input` one is the graphs' fidelity.

The `frames` suite decodes every scored frame of the same cines alone, from a box and without
memory (sam2's `SAM2ImagePredictor`: what a conditioning frame gets), with the exact truth box
(`frames/<model>/fp32/exact-box`) and with a box jittered as the `box` regime's keyframes are
(`.../jittered-box`). Tracking keeps at best what a frame decodes: this is its ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import reproduce_command, stats, write_record
from rau_rt.bundle import load_bundle
from rau_rt.commands.demo import SHIPPED_SAM2
from rau_rt.config import EngineConfig
from rau_rt.ops import IMAGENET_MEAN, IMAGENET_STD
from rau_rt.sam2_layout import MAX_CONDITIONING
from rau_rt.synthetic import generate_sequence, make_reference
from rau_rt.synthetic.scoring import Scorecard
from rau_rt.tracking import Tracker, TrackerConfig
from rau_rt.train import HELD_OUT_SEEDS

SUITE = "accuracy"
BASELINE = "sam2-predictor"
REGIMES = ("mask", "box", "reference")
KEYFRAME_EVERY = 15  # the demo's VLM schedule: one keyframe a second at 15 fps
REFERENCE_SEED_OFFSET = 5000  # the reference patient of cine `seed` is seed + 5000 (held out)
IMAGE_SIZE = 256  # the demo configs' input side


@dataclass(frozen=True)
class Sam2Weights:
    """Trained SAM2 weights and the config (architecture) they fit."""

    path: Path
    config: str

    @classmethod
    def of(cls, path: Path, config: str | None = None) -> Sam2Weights:
        """`config` as given, else as the file's metadata names it (`rau-rt train sam2`'s
        .safetensors do; a sam2 .pt does not, and needs `config`)."""
        from rau_rt.errors import InputError
        from rau_rt.export.sam2.model import SMALL_CONFIGS, stored_config

        config = config or stored_config(path)
        if config not in SMALL_CONFIGS:
            raise InputError(f"SAM2 weights {path}: config {config!r}; expected one of "
                             f"{SMALL_CONFIGS} (pass --config for a .pt)")
        return cls(Path(path), config)

    @property
    def label(self) -> str:
        """The model part of a case name, e.g. "micro@256"."""
        return f"{self.config}@{IMAGE_SIZE}"

    def source(self):
        from rau_rt.export.sam2.model import ModelSource

        return ModelSource(image_size=IMAGE_SIZE, checkpoint=self.path, config=self.config)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """`--weights` and `--config`, as `Sam2Weights.of` reads them."""
        from rau_rt.export.sam2.model import SMALL_CONFIGS

        parser.add_argument("--weights", type=Path, default=SHIPPED_SAM2,
                            help="SAM2 weights at 256 px (.safetensors or sam2 .pt); default "
                                 "the shipped demo weights")
        parser.add_argument("--config", choices=SMALL_CONFIGS, default=None,
                            help="the architecture --weights fit (default: as the "
                                 ".safetensors metadata names it; a .pt needs it)")

    def predictor(self):
        """sam2's video predictor holding the weights, hole filling off (no `sam2._C`)."""
        from rau_rt.export.sam2.model import load_checkpoint

        model = load_checkpoint(self.path, self.config, IMAGE_SIZE)
        model.fill_hole_area = 0
        return model


@dataclass(frozen=True)
class Cine:
    seed: int
    artery: str
    dominance: str
    look: str
    stenoses: int


HELD_OUT = (
    Cine(101, "left", "right", "clinical", 0), Cine(102, "right", "right", "clinical", 1),
    Cine(103, "left", "left", "clinical", 2), Cine(104, "left", "right", "classic", 1),
    Cine(105, "right", "left", "clinical", 0), Cine(106, "left", "right", "clinical", 2),
    Cine(107, "right", "right", "classic", 0), Cine(108, "left", "right", "clinical", 1),
)
assert all(c.seed in HELD_OUT_SEEDS and c.seed + REFERENCE_SEED_OFFSET in HELD_OUT_SEEDS
           for c in HELD_OUT)


@dataclass
class Prepared:
    """One cine made ready for every row: frames as both sides read them, regions, prompts."""

    cine: Cine
    sequence: object
    regions: tuple[str, ...]
    first: int  # the first frame where every region shows
    rgb: list[np.ndarray]  # decoded JPEG frames (what the predictor reads)
    video: Path
    reference_rgb: np.ndarray
    reference_masks: np.ndarray  # (regions, H, W) bool, from the reference's polygons
    boxes: dict[int, list[np.ndarray | None]]  # frame -> per region jittered box or None


def _choose_regions(sequence) -> tuple[tuple[str, ...], int]:
    counts = [sum(s.present for s in t.segments.values()) for t in sequence.truth]
    plateau = int(np.argmax(counts))
    shown = [n for n, s in sequence.truth[plateau].segments.items() if s.present and s.box]
    by_calibre = sorted(shown, key=lambda n: -sequence.meta.diameters_mm[n])
    picks = [by_calibre[i] for i in sorted({0, 1, len(by_calibre) // 2, len(by_calibre) - 1})
             if i < len(by_calibre)]
    regions = tuple(n for n in sequence.meta.segments if n in picks)
    first = next(k for k, t in enumerate(sequence.truth)
                 if all(t.segments[n].present and t.segments[n].box for n in regions))
    return regions, first


def write_jpegs(directory: Path, frames: list[np.ndarray]) -> list[np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).convert("RGB").save(directory / f"{i:05d}.jpg", quality=95)
    return [np.array(Image.open(directory / f"{i:05d}.jpg").convert("RGB"))
            for i in range(len(frames))]


def prepare(cine: Cine, frames: int, workdir: Path) -> Prepared:
    from rau_rt.train.sam2_data import jitter_box

    sequence = generate_sequence(seed=cine.seed, frames=frames, size=512, fps=15.0,
                                 artery=cine.artery, dominance=cine.dominance,
                                 stenoses=cine.stenoses, look=cine.look)
    regions, first = _choose_regions(sequence)
    reference = make_reference(cine.seed + REFERENCE_SEED_OFFSET, 512, artery=cine.artery,
                               dominance=cine.dominance, segments=regions,
                               avoid_view=sequence.meta.view, look=cine.look)
    import cv2

    masks = []
    for region in reference.regions:
        canvas = np.zeros((512, 512), np.uint8)
        points = np.round(np.asarray(region.polygon) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [points], 1, cv2.LINE_8, shift=4)
        masks.append(canvas.astype(bool))
    video = workdir / f"cine{cine.seed}"
    rgb = write_jpegs(video, list(sequence.frames_8bit()))
    (reference_rgb,) = write_jpegs(workdir / f"reference{cine.seed}", [reference.image_8bit()])
    rng = np.random.default_rng([cine.seed, 20])
    boxes = {}
    for k in range(first, frames, KEYFRAME_EVERY):
        truth = sequence.truth[k].segments
        boxes[k] = [jitter_box(np.asarray(truth[n].box, np.float32), 512, rng)
                    if truth[n].present and truth[n].box else None for n in regions]
    return Prepared(cine, sequence, regions, first, rgb, video, reference_rgb, np.stack(masks),
                    boxes)


def schedule(p: Prepared, regime: str) -> tuple[list[int], dict[int, tuple[str, list]]]:
    """Scored frame indices and prompt events {frame: ("mask"|"box", per-region values)}; frame
    -1 is the reference (regime `reference`) or the masked first frame (regime `mask`)."""
    n = len(p.rgb)
    if regime == "mask":
        masks = [p.sequence.truth[p.first].segments[r].mask(512) for r in p.regions]
        return list(range(p.first + 1, n)), {-1: ("mask", masks)}
    if regime == "box":
        return list(range(p.first, n)), {k: ("box", v) for k, v in p.boxes.items()}
    return list(range(n)), {-1: ("mask", list(p.reference_masks)),
                            p.first: ("box", p.boxes[p.first])}


def sam2_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """A frame as sam2's video predictor prepares it (PIL's default bicubic resize of the RGB
    image, /255, ImageNet mean and std), as the tracker's float32 (3, S, S) model input."""
    x = np.asarray(Image.fromarray(rgb).resize((size, size)), np.float32) / 255.0
    mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def tracker_run(bundle, p: Prepared, regime: str, same_input: bool = False,
                events: dict[int, tuple[str, list]] | None = None,
                config: TrackerConfig | None = None,
                ) -> tuple[dict[int, np.ndarray], list[float], list[int]]:
    """The Tracker over the regime's frames and prompts (or `events` instead of the regime's
    prompts: the pipeline suite's VLM boxes); `same_input` runs it as sam2 runs: on sam2's own
    preprocessed frames instead of `ops.preprocess`'s (bilinear) and with room for every
    keyframe as a conditioning frame (sam2 keeps them all). `config`: the tracker's settings
    (its profile; default sam2's), with hole filling off and the conditioning room set here.
    Returns the masks per frame, ms per frame and the regions that ran windowed per frame
    (`TrackStep.windowed`; 0 without `memory_window`)."""
    frames, scheduled = schedule(p, regime)
    events = scheduled if events is None else events
    conditioning = len(events) if same_input else TrackerConfig.max_conditioning
    if conditioning > MAX_CONDITIONING:
        raise ValueError(f"{conditioning} prompted frames: sam2 would attend more conditioning "
                         f"frames than the tracker holds ({MAX_CONDITIONING})")
    tracker = Tracker(bundle, replace(config or TrackerConfig(), fill_hole_area=0,
                                      max_conditioning=conditioning))
    names = list(p.regions)
    size = tracker.layout.image_size

    def model_input(image: np.ndarray) -> dict:
        return ({"frame": sam2_input(image, size), "frame_size": image.shape[:2]}
                if same_input else {"frame": image})

    if -1 in events:
        image = p.rgb[p.first] if regime == "mask" else p.reference_rgb
        given = model_input(image)
        tracker.add_reference(given.pop("frame"), dict(zip(names, events[-1][1], strict=True)),
                              **given)
    out, ms, windowed = {}, [], []
    for k in frames:
        boxes = {n: b for n, b in zip(names, events.get(k, (None, []))[1], strict=False)
                 if b is not None}
        if boxes:
            tracker.prompt(k - frames[0], boxes)
        started = time.perf_counter()
        step = tracker.step(**model_input(p.rgb[k]))
        ms.append((time.perf_counter() - started) * 1e3)
        windowed.append(len(step.windowed))
        out[k] = np.stack([step.regions[n].mask if n in step.regions and step.regions[n].present
                           else np.zeros((512, 512), bool) for n in names])
    return out, ms, windowed


def predictor_run(model, p: Prepared, regime: str, workdir: Path,
                  ) -> tuple[dict[int, np.ndarray], list[float]]:
    """sam2's predictor over the same frames; its video starts with the masked frame or the
    reference where the regime has one, so frame indices shift by `offset`."""
    import torch

    frames, events = schedule(p, regime)
    # the very JPEG files the tracker decoded, renumbered from 0
    files = sorted(p.video.glob("*.jpg"))
    if regime == "reference":
        offset = 1  # predictor frame = cine frame + 1; the reference is predictor frame 0
        files = [p.video.parent / f"reference{p.cine.seed}" / "00000.jpg", *files]
    else:  # the video starts at the first frame where every region shows
        offset = -p.first
        files = files[p.first:]
    video = workdir / f"predictor{p.cine.seed}_{regime}"
    video.mkdir()
    for i, file in enumerate(files):
        shutil.copyfile(file, video / f"{i:05d}.jpg")
    first_predictor = 0 if -1 in events else frames[0] + offset
    starts = sorted({0 if k == -1 else k + offset for k in events})
    values = {0 if k == -1 else k + offset: v for k, v in events.items()}
    last = frames[-1] + offset
    out, ms = {}, []
    with torch.inference_mode(), warnings.catch_warnings(), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        state = model.init_state(str(video))
        for i, start in enumerate(starts):
            kind, per_region = values[start]
            for obj, value in enumerate(per_region):
                if value is None:
                    continue
                if kind == "mask":
                    model.add_new_mask(state, frame_idx=start, obj_id=obj, mask=value)
                else:
                    model.add_new_points_or_box(state, frame_idx=start, obj_id=obj, box=value)
            end = starts[i + 1] - 1 if i + 1 < len(starts) else last
            frames_iter = model.propagate_in_video(state, start_frame_idx=start,
                                                   max_frame_num_to_track=end - start)
            while True:
                started = time.perf_counter()
                try:
                    index, ids, masks = next(frames_iter)
                except StopIteration:
                    break
                ms.append((time.perf_counter() - started) * 1e3)
                if index < first_predictor or index - offset not in frames:
                    continue
                got = np.zeros((len(p.regions), 512, 512), bool)
                for obj, mask in zip(ids, (masks[:, 0] > 0).cpu().numpy(), strict=True):
                    got[obj] = mask
                out[index - offset] = got
    return out, ms


def score(p: Prepared, masks: dict[int, np.ndarray], card: Scorecard) -> None:
    diameters = p.sequence.meta.diameters_mm
    for k, got in masks.items():
        truth = p.sequence.truth[k]
        for i, name in enumerate(p.regions):
            card.add(f"{p.cine.seed}/{name}", got[i], truth.segments[name], truth, (512, 512),
                     diameters[name])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def export_bundle(weights: Sam2Weights, out: Path, gate: bool) -> dict[str, str]:
    """The weights exported at 256 px in int8 (where the exporter accepts it, or every
    graph with `gate` off); returns each graph's first (default) precision."""
    from rau_rt.export.sam2 import Sam2ExportConfig, export_sam2
    from rau_rt.export.sam2.inputs import CheckFrames

    with contextlib.redirect_stderr(io.StringIO()):
        manifest, _ = export_sam2(Sam2ExportConfig(weights.source(), out, precision="int8",
                                                   precision_gate=gate),
                                  CheckFrames.synthetic(generate_sequence, regions=2))
    return {g: manifest.entries(g)[0].precision for g in manifest.graph_names}


def run(weights: Sam2Weights, cines: tuple[Cine, ...], frames: int, workdir: Path,
        ) -> tuple[list[dict], dict]:
    gated = export_bundle(weights, workdir / "gated", gate=True)
    export_bundle(weights, workdir / "all", gate=False)
    engine = EngineConfig(spin_wait=False)
    bundles = {"fp32": load_bundle(workdir / "all", config=EngineConfig(precision="fp32",
                                                                       spin_wait=False)),
               "int8": load_bundle(workdir / "all", config=engine)}
    if set(gated.values()) != {"int8"}:
        bundles["int8-gated"] = load_bundle(workdir / "gated", config=engine)
    predictor = weights.predictor()
    prepared = [prepare(c, frames, workdir) for c in cines]
    cases = []
    for regime in REGIMES:
        cards = {name: Scorecard() for name in ("predictor", *bundles)}
        times: dict[str, list[float]] = {name: [] for name in cards}
        ious: dict[str, list[float]] = {name: [] for name in bundles}
        same_input: list[float] = []  # fp32 tracker on sam2's own preprocessed frames
        for p in prepared:
            theirs, ms = predictor_run(predictor, p, regime, workdir)
            score(p, theirs, cards["predictor"])
            times["predictor"].extend(ms[2:])
            same, _, _ = tracker_run(bundles["fp32"], p, regime, same_input=True)
            same_input.extend(_iou(same[k][i], theirs[k][i]) for k in same
                              for i in range(len(p.regions))
                              if same[k][i].any() or theirs[k][i].any())
            for precision, bundle in bundles.items():
                ours, ms, _ = tracker_run(bundle, p, regime)
                score(p, ours, cards[precision])
                times[precision].extend(ms[2:])
                ious[precision].extend(_iou(ours[k][i], theirs[k][i]) for k in ours
                                       for i in range(len(p.regions))
                                       if ours[k][i].any() or theirs[k][i].any())
        base = stats(np.asarray(times["predictor"]))
        for name, card in cards.items():
            mine = stats(np.asarray(times[name]))
            row = "predictor" if name == "predictor" else "tracker"
            precision = "fp32" if name == "predictor" else name
            case = {"case": f"{row}/{weights.label}/{precision}/{regime}",
                    "backend": "torch-cpu" if row == "predictor" else "onnxruntime-cpu",
                    "precision": precision, **mine, "baseline": BASELINE,
                    "baseline_median_ms": base["median_ms"], "baseline_p90_ms": base["p90_ms"],
                    "speedup": base["median_ms"] / mine["median_ms"],
                    "task": card.summary(), "fidelity": {}}
            if ious.get(name):
                case["fidelity"] = {"iou_vs_predictor_mean": float(np.mean(ious[name])),
                                    "iou_vs_predictor_min": float(np.min(ious[name])),
                                    "iou_vs_predictor_p01": float(np.percentile(ious[name], 1))}
            if name == "fp32" and same_input:
                case["fidelity"].update({
                    "iou_vs_predictor_same_input_mean": float(np.mean(same_input)),
                    "iou_vs_predictor_same_input_min": float(np.min(same_input)),
                    "iou_vs_predictor_same_input_p01": float(np.percentile(same_input, 1))})
            cases.append(case)
            print(json.dumps({k: case[k] for k in ("case", "median_ms", "task", "fidelity")}),
                  flush=True)
    for bundle in bundles.values():
        bundle.close()
    facts = {"weights": str(weights.path), "config": weights.config,
             "exporter_int8_choice": gated,
             "int8_gated_row": "int8-gated" in bundles,
             "cines": [c.__dict__ | {"regions": p.regions, "first_frame": p.first}
                       for c, p in zip(cines, prepared, strict=True)],
             "frames": frames, "keyframe_every": KEYFRAME_EVERY}
    return cases, facts


def summary(record: dict) -> str:
    """The README table: accuracy per row and regime."""
    lines = ["| case | Dice (≥ 2 mm) | Dice all | boundary F | presence (changing) | "
             "IoU vs predictor (same input) | ms/frame |", "|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for c in record["cases"]:
        t, fidelity = c["task"], c["fidelity"]
        iou = f(fidelity.get("iou_vs_predictor_mean"))
        if "iou_vs_predictor_same_input_mean" in fidelity:
            iou += f" ({f(fidelity['iou_vs_predictor_same_input_mean'])})"
        lines.append(f"| {c['case']} | {f(t['dice_ge2mm'])} | {f(t['dice_mean'])} | "
                     f"{f(t['boundary_f'])} | {f(t['presence_acc'])} "
                     f"({f(t['presence_acc_changing'])}) | {iou} | {c['median_ms']:.1f} |")
    lines += ["", "Dice of the fp32 tracker by calibre (segment mean diameter) and by cardiac "
              "phase (all calibres):", "",
              "| regime | ≥ 3 mm | 2-3 mm | < 2 mm | diastole | mid | systole |",
              "|---|---|---|---|---|---|---|"]
    for c in record["cases"]:
        if c["case"].startswith("tracker/") and c["precision"] == "fp32":
            calibre, phase = c["task"]["dice_by_calibre"], c["task"]["dice_by_phase"]
            cells = [calibre.get(k) for k in (">=3mm", "2-3mm", "<2mm")]
            cells += [phase.get(k) for k in ("diastole", "mid", "systole")]
            lines.append(f"| {c['case'].rsplit('/', 1)[1]} | " + " | ".join(map(f, cells)) + " |")
    return "\n".join(lines)


def frames_suite(weights: Sam2Weights, cines: tuple[Cine, ...], frames: int, workdir: Path,
                 ) -> tuple[list[dict], dict]:
    """The `frames` cases (module docstring): sam2's image predictor on each frame alone."""
    import torch

    from rau_rt.train.sam2_data import jitter_box

    with warnings.catch_warnings():  # its transforms torch.jit.script (deprecated) at init
        warnings.simplefilter("ignore")
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(weights.predictor())
    # its feature sizes are fixed for 1024 px inputs; these are the 256 px model's
    predictor._bb_feat_sizes = [(IMAGE_SIZE // s, IMAGE_SIZE // s) for s in (4, 8, 16)]
    prepared = [prepare(c, frames, workdir) for c in cines]
    cases = []
    for kind in ("exact-box", "jittered-box"):
        card, ms = Scorecard(), []
        for p in prepared:
            rng = np.random.default_rng([p.cine.seed, 21])
            masks = {}
            for k in range(p.first, frames):
                truth = p.sequence.truth[k].segments
                got = np.zeros((len(p.regions), 512, 512), bool)
                started = time.perf_counter()
                with torch.inference_mode():
                    predictor.set_image(p.rgb[k])
                    for i, name in enumerate(p.regions):
                        if not (truth[name].present and truth[name].box):
                            continue  # as the VLM answers null: no prompt, no mask
                        box = np.asarray(truth[name].box, np.float32)
                        if kind == "jittered-box":
                            box = jitter_box(box, 512, rng)
                        got[i] = predictor.predict(box=box, multimask_output=False)[0][0] > 0
                ms.append((time.perf_counter() - started) * 1e3)
                masks[k] = got
            score(p, masks, card)
        cases.append({"case": f"frames/{weights.label}/fp32/{kind}", "backend": "torch-cpu",
                      "precision": "fp32", **stats(np.asarray(ms)), "task": card.summary(),
                      "fidelity": {}})
        print(json.dumps({k: cases[-1][k] for k in ("case", "median_ms", "task")}), flush=True)
    facts = {"weights": str(weights.path), "config": weights.config,
             "cines": [c.__dict__ | {"regions": p.regions, "first_frame": p.first}
                       for c, p in zip(cines, prepared, strict=True)], "frames": frames}
    return cases, facts


def frames_summary(record: dict) -> str:
    lines = ["| case | Dice (≥ 2 mm) | Dice all | boundary F | ≥ 3 mm | 2-3 mm | < 2 mm | "
             "ms/frame |", "|---|---|---|---|---|---|---|---|"]
    for c in record["cases"]:
        t = c["task"]
        cells = [t["dice_ge2mm"], t["dice_mean"], t["boundary_f"],
                 *(t["dice_by_calibre"].get(k) for k in (">=3mm", "2-3mm", "<2mm"))]
        lines.append(f"| {c['case']} | " + " | ".join("-" if v is None else f"{v:.3f}"
                                                     for v in cells)
                     + f" | {c['median_ms']:.1f} |")
    return "\n".join(lines)


SUITES = ("tracker", "frames", "localizer", "pipeline")
QUICK_PAIRS, FULL_PAIRS = 16, 120


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=SUITES, default="tracker",
                        help="tracker: the SAM2 regimes (default); frames: each frame decoded "
                             "alone from a box, the tracking's ceiling; localizer: the VLM's boxes "
                             "on held-out pairs per precision; pipeline: VLM keyframes -> "
                             "SAM2 beside truth boxes (benchmarks/accuracy_vlm.py)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tracker and pipeline: 2 cines of 40 frames; localizer: "
                             f"{QUICK_PAIRS} pairs (each about 3 minutes)")
    Sam2Weights.add_arguments(parser)
    parser.add_argument("--vlm-weights", type=Path, default=None,
                        help="the VLM's fp16 safetensors (`rau-rt train vlm`'s "
                             "vlm.fp16.safetensors); default the shipped demo weights")
    parser.add_argument("--json", default=None, help="where to write the JSON record")
    args = parser.parse_args(argv)
    from benchmarks import accuracy_vlm

    cines, frames = (HELD_OUT[:2], 40) if args.quick else (HELD_OUT, 60)
    weights = Sam2Weights.of(args.weights, args.config)
    name = "accuracy" if args.suite == "tracker" else f"accuracy_{args.suite}"
    path = args.json or f"benchmarks/results/{name}{'_quick' if args.quick else ''}_cpu.json"
    vlm_weights = args.vlm_weights or accuracy_vlm.DEMO_VLM
    with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as tmp:
        if args.suite == "tracker":
            cases, facts = run(weights, cines, frames, Path(tmp))
        elif args.suite == "frames":
            cases, facts = frames_suite(weights, cines, frames, Path(tmp))
        elif args.suite == "localizer":
            cases, facts = accuracy_vlm.localizer_suite(
                vlm_weights, QUICK_PAIRS if args.quick else FULL_PAIRS, Path(tmp))
        else:
            cases, facts = accuracy_vlm.pipeline_suite(vlm_weights, weights, cines, frames,
                                                       Path(tmp))
    command = reproduce_command("bench_accuracy", args, parser.parse_args([]))
    record = write_record(SUITE if args.suite == "tracker" else name, cases, path, command)
    record.update(facts)
    record["summary_md"] = {"tracker": summary, "frames": frames_summary}.get(
        args.suite, accuracy_vlm.summary)(record)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    print(record["summary_md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
