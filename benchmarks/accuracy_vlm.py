"""The `localizer` and `pipeline` suites of `benchmarks.bench_accuracy`: the trained demo VLM.

    python -m benchmarks.bench_accuracy --suite localizer|pipeline [--quick] [--vlm-weights FILE]

`localizer`: held-out pairs (`rau_rt.train.vlm_data.PairMaker.query` on fixed seeds from
`HELD_OUT_PAIRS`, unaugmented, never trained on: a reference of one patient and view, a frame
of another patient's run in another view, square or reframed to 4:3 / 16:9 and their
transposes) asked through the runtime's `Localizer` (constrained decoding, reference prefix
cache) on the bundle `rau-rt export vlm --aspect-buckets` makes of the weights (each frame at
its aspect's vision graph), once per precision: fp32, fp16 (graphs in fp16 on the CPU
provider), int8 (weight-only int8 decoder, dynamic int8 vision), int4 (int4 decoder, dynamic
int8 vision). Scored per requested segment against the truth box: parse rate (the answer is
a JSON list naming every region; constrained decoding must make it 100 %), hit rate
(IoU >= 0.5) of the visible segments, overall and on segments >= 3 mm, mean IoU, centre error
in mm, presence precision / recall / F1 (a box given vs the segment visible); per calibre and
per segment.

`pipeline`: the held-out cines of the tracker suite (`bench_accuracy.HELD_OUT`); on the `box`
regime's keyframes (the first frame where the four segments show, then every
`KEYFRAME_EVERY` frames) the localizer, given the cine's reference (another patient, another
view), answers boxes that prompt the trained SAM2 (the tracker on its exporter-chosen int8
bundle); scored with the tracker suite's scorecard beside the same run prompted with the
jittered truth boxes on the same keyframes (`truth-box`: the upper bound), so the Dice gap is
what the VLM costs. Keyframes are synchronous here (the pipeline's worker runs them
asynchronously, and the policy's extra triggers depend on timing), so the numbers repeat.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.harness import stats
from rau_rt.bundle import load_bundle
from rau_rt.config import EngineConfig
from rau_rt.geometry import box_iou
from rau_rt.localization import Localizer, LocalizerConfig
from rau_rt.localization.parse import NO_JSON, NOT_IN_ANSWER
from rau_rt.reference import Reference
from rau_rt.train import HELD_OUT_SEEDS
from rau_rt.types import Region

if TYPE_CHECKING:  # bench_accuracy imports this module
    from benchmarks.bench_accuracy import Sam2Weights

MODEL = "micro"  # the demo localizer's size (`rau-rt train vlm`'s default)
INPUT = 224  # the trained input size (aspect buckets at its pixel budget)
PRECISIONS = ("fp32", "fp16", "int8", "int4")
HELD_OUT_PAIRS = range(HELD_OUT_SEEDS.start + 2000, HELD_OUT_SEEDS.start + 2200)
HIT_IOU = 0.5
CALIBRES = ((">=3mm", 3.0, np.inf), ("2-3mm", 2.0, 3.0), ("<2mm", 0.0, 2.0))
DEMO_VLM = Path(__file__).resolve().parents[1] / "rau_rt" / "weights" / "vlm_micro.safetensors"
assert HELD_OUT_PAIRS.stop <= HELD_OUT_SEEDS.stop


def export_bundles(weights: Path, workdir: Path, precisions=PRECISIONS) -> dict[str, Path]:
    """precision -> a loadable bundle folder: the weights restored to a model folder and
    exported at `INPUT` with its aspect buckets (fp32 comes from the int8 bundle, exported with
    `keep_reference` so that it keeps the verified fp32 graphs beside the int8 ones)."""
    from rau_rt.export import vlm
    from rau_rt.train.vlm_trainer import restore

    folder = restore(weights, workdir / "vlm-model")
    made = {}
    for precision in {"fp16": "fp16", "int8": "int8", "int4": "int4", "fp32": "int8"}.values():
        if precision in made or not ({precision, "fp32"} & set(precisions)):
            continue
        with contextlib.redirect_stderr(io.StringIO()):
            summary = vlm.export_vlm(vlm.VlmExportConfig(out=workdir / f"vlm-{precision}",
                                                         model=folder, input_size=INPUT,
                                                         aspect_buckets=True,
                                                         precision=precision,
                                                         keep_reference=precision == "int8"))
        made[precision] = Path(summary["bundle"])
    return {p: made["int8" if p == "fp32" else p] for p in precisions}


def model_name(weights: Path) -> str:
    """The size a run's weights were trained at (their metadata): the cases' <model>."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        return (handle.metadata() or {}).get("size", MODEL)


def load_precision(folder: Path, precision: str):
    """The bundle at `precision` (fp32: its verified fp32 graphs)."""
    config = EngineConfig(precision="fp32" if precision == "fp32" else None, spin_wait=False)
    return load_bundle(folder, config=config)


@dataclass
class Tally:
    """Per-segment outcomes of one precision."""

    queries: int = 0
    parsed: int = 0
    ious: list[tuple[float, float, str]] = None  # (iou, calibre mm, segment) per visible one
    centre_mm: list[float] = None
    tp: int = 0
    fp: int = 0
    fn: int = 0
    ms: list[float] = None

    def __post_init__(self) -> None:
        self.ious, self.centre_mm, self.ms = [], [], []

    def add(self, result, query) -> None:
        self.queries += 1
        self.parsed += all(r != NOT_IN_ANSWER and not r.startswith(NO_JSON)
                           for r in result.reasons.values())
        self.ms.append(result.timings_ms["total"])
        for name in query.names:
            truth, box = query.truth[name], result.boxes.get(name)
            self.tp += truth is not None and box is not None
            self.fp += truth is None and box is not None
            self.fn += truth is not None and box is None
            if truth is None:
                continue
            self.ious.append((0.0 if box is None else box_iou(box, truth),
                              query.calibre_mm[name], name))
            if box is not None:
                self.centre_mm.append(query.spacing_mm * float(np.hypot(
                    (box[0] + box[2] - truth[0] - truth[2]) / 2,
                    (box[1] + box[3] - truth[1] - truth[3]) / 2)))

    def task(self) -> dict[str, object]:
        def hits(rows):
            return float(np.mean([iou >= HIT_IOU for iou, *_ in rows])) if rows else None

        precision = self.tp / max(1, self.tp + self.fp)
        recall = self.tp / max(1, self.tp + self.fn)
        by_segment: dict[str, list] = {}
        for row in self.ious:
            by_segment.setdefault(row[2], []).append(row)
        return {
            "queries": self.queries, "visible_segments": len(self.ious),
            "parse_rate": self.parsed / max(1, self.queries),
            "hit_rate": hits(self.ious),
            "hit_rate_ge3mm": hits([r for r in self.ious if r[1] >= 3.0]),
            "mean_iou": float(np.mean([r[0] for r in self.ious])) if self.ious else None,
            "centre_error_mm_median": (float(np.median(self.centre_mm))
                                       if self.centre_mm else None),
            "presence_precision": precision, "presence_recall": recall,
            "presence_f1": 2 * self.tp / max(1, 2 * self.tp + self.fp + self.fn),
            "hit_rate_by_calibre": {label: hits([r for r in self.ious if lo <= r[1] < hi])
                                    for label, lo, hi in CALIBRES},
            "hit_rate_by_segment": {name: hits(rows) for name, rows in sorted(by_segment.items())},
        }


def localizer_suite(weights: Path, pairs: int, workdir: Path, precisions=PRECISIONS,
                    ) -> tuple[list[dict], dict]:
    """The `localizer` cases: `localizer/<model>/<precision>`."""
    from rau_rt.train.vlm_data import PairMaker
    from rau_rt.vlm_layout import read_layout

    folders = export_bundles(weights, workdir, precisions)
    layout = read_layout(folders["fp32"])
    maker = PairMaker(layout, (folders["fp32"] / "tokenizer.json").read_text(), augment=False)
    queries = []
    for seed in HELD_OUT_PAIRS:
        query = maker.query(seed)
        if query is not None:
            queries.append(query)
        if len(queries) == pairs:
            break
    cases, answers = [], {}
    for precision, folder in folders.items():
        tally = Tally()
        bundle = load_precision(folder, precision)
        try:
            localizers: dict[int, Localizer] = {}
            for query in queries:
                key = id(query.reference)
                if key not in localizers:
                    localizers = {key: Localizer(bundle, query.reference, LocalizerConfig())}
                result = localizers[key].locate_result(query.frame, query.names)
                tally.add(result, query)
                answers.setdefault(precision, []).append(result.text)
        finally:
            bundle.close()
        timing = stats(np.asarray(tally.ms))
        case = {"case": f"localizer/{model_name(weights)}/{precision}",
                "backend": "onnxruntime-cpu", "precision": precision, **timing,
                "task": tally.task(), "fidelity": {}}
        if precision != "fp32" and "fp32" in answers:
            same = [a == b for a, b in zip(answers[precision], answers["fp32"], strict=True)]
            case["fidelity"] = {"answer_equal_to_fp32": float(np.mean(same))}
        cases.append(case)
        print(json.dumps({k: case[k] for k in ("case", "median_ms", "fidelity")}
                         | {"task": {k: v for k, v in case["task"].items()
                                     if not isinstance(v, dict)}}), flush=True)
    shapes = {}
    for query in queries:
        key = "x".join(map(str, query.frame.shape[:2]))
        shapes[key] = shapes.get(key, 0) + 1
    facts = {"vlm_weights": str(weights), "input_size": INPUT, "pairs": len(queries),
             "pair_seeds": [HELD_OUT_PAIRS.start, HELD_OUT_PAIRS.stop - 1],
             "frame_shapes": shapes}
    return cases, facts


def cine_reference(p) -> Reference:
    """The annotated reference the tracker suite built for cine `p` (same seed, regions)."""
    from benchmarks.bench_accuracy import REFERENCE_SEED_OFFSET
    from rau_rt.synthetic import make_reference

    cine = p.cine
    still = make_reference(cine.seed + REFERENCE_SEED_OFFSET, 512, artery=cine.artery,
                           dominance=cine.dominance, segments=p.regions,
                           avoid_view=p.sequence.meta.view, look=cine.look)
    return Reference(still.image_8bit(), tuple(Region(r.name, box=r.box, polygon=r.polygon)
                                               for r in still.regions))


def pipeline_suite(weights: Path, sam2_weights: Sam2Weights, cines, frames: int, workdir: Path,
                   precisions=("fp32", "int4")) -> tuple[list[dict], dict]:
    """The `pipeline` cases: `pipeline/<model>/<vlm precision>/vlm` and `.../truth-box`."""
    from benchmarks.bench_accuracy import export_bundle, prepare, schedule, score, tracker_run
    from rau_rt.synthetic.scoring import Scorecard

    folders = export_bundles(weights, workdir, precisions)
    sam2_choice = export_bundle(sam2_weights, workdir / "sam2", gate=True)
    sam2 = load_bundle(workdir / "sam2", config=EngineConfig(spin_wait=False))
    prepared = [prepare(c, frames, workdir) for c in cines]
    cards = {"truth-box": Scorecard(), **{p: Scorecard() for p in precisions}}
    located = {p: [] for p in precisions}  # keyframe hits of the VLM's boxes
    vlm_ms = {p: [] for p in precisions}
    try:
        for p in prepared:
            masks, _, _ = tracker_run(sam2, p, "box")
            score(p, masks, cards["truth-box"])
            reference = cine_reference(p)
            _, events = schedule(p, "box")
            for precision in precisions:
                bundle = load_precision(folders[precision], precision)
                try:
                    localizer = Localizer(bundle, reference, LocalizerConfig())
                    answered = {}
                    for k in events:
                        started = time.perf_counter()
                        boxes = localizer.locate(p.rgb[k], p.regions)
                        vlm_ms[precision].append((time.perf_counter() - started) * 1e3)
                        answered[k] = ("box", [None if boxes[n] is None else
                                               np.asarray(boxes[n], np.float32)
                                               for n in p.regions])
                        for n in p.regions:
                            truth = p.sequence.truth[k].segments[n]
                            if truth.present and truth.box:
                                located[precision].append(
                                    boxes[n] is not None and box_iou(boxes[n], truth.box)
                                    >= HIT_IOU)
                finally:
                    bundle.close()
                masks, _, _ = tracker_run(sam2, p, "box", events=answered)
                score(p, masks, cards[precision])
    finally:
        sam2.close()
    cases = []
    for name, card in cards.items():
        task = card.summary()
        case = {"case": f"pipeline/{model_name(weights)}/{'-' if name == 'truth-box' else name}/"
                        f"{'truth-box' if name == 'truth-box' else 'vlm'}",
                "precision": "-" if name == "truth-box" else name, "task": task}
        if name != "truth-box":
            task["keyframe_hit_rate"] = float(np.mean(located[name])) if located[name] else None
            task["dice_gap_to_truth_box"] = (cards["truth-box"].summary()["dice_ge2mm"]
                                            - task["dice_ge2mm"])
            case.update(stats(np.asarray(vlm_ms[name])))
        cases.append(case)
        print(json.dumps({"case": case["case"], "dice_ge2mm": task["dice_ge2mm"],
                          "gap": task.get("dice_gap_to_truth_box")}), flush=True)
    facts = {"vlm_weights": str(weights), "sam2_weights": str(sam2_weights.path),
             "sam2_precision": sam2_choice, "frames": frames,
             "cines": [c.__dict__ | {"regions": p.regions, "first_frame": p.first}
                       for c, p in zip(cines, prepared, strict=True)]}
    return cases, facts


def summary(record: dict) -> str:
    """The README tables of the localizer and pipeline cases in `record`."""
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = []
    localizer = [c for c in record["cases"] if c["case"].startswith("localizer/")]
    if localizer:
        lines += ["| case | parse | hit (IoU ≥ 0.5) | hit ≥ 3 mm | mean IoU | centre error mm | "
                  "presence P / R / F1 | ms/query |", "|---|---|---|---|---|---|---|---|"]
        for c in localizer:
            t = c["task"]
            lines.append(f"| {c['case']} | {f(t['parse_rate'])} | {f(t['hit_rate'])} | "
                         f"{f(t['hit_rate_ge3mm'])} | {f(t['mean_iou'])} | "
                         f"{f(t['centre_error_mm_median'])} | {f(t['presence_precision'])} / "
                         f"{f(t['presence_recall'])} / {f(t['presence_f1'])} | "
                         f"{c['median_ms']:.0f} |")
    pipeline = [c for c in record["cases"] if c["case"].startswith("pipeline/")]
    if pipeline:
        lines += ["", "| case | Dice (≥ 2 mm) | Dice all | presence | keyframe hit | "
                  "gap to truth boxes |", "|---|---|---|---|---|---|"]
        for c in pipeline:
            t = c["task"]
            lines.append(f"| {c['case']} | {f(t['dice_ge2mm'])} | {f(t['dice_mean'])} | "
                         f"{f(t['presence_acc'])} | {f(t.get('keyframe_hit_rate'))} | "
                         f"{f(t.get('dice_gap_to_truth_box'))} |")
    return "\n".join(lines)
