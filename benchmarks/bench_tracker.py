"""The Tracker vs sam2's SAM2VideoPredictor: per-frame latency per profile and region count,
Dice against truth on trained weights, memory over a long stream.

    python -m benchmarks.bench_tracker [--quick] [--device cuda] [--frames N] [--json PATH]
        [--run CONFIG@SIZE] [--regions N,N] [--memory-pool 2] [--memory-window K]

Latency (cases `<config>@<size>/<regions>r/<precision>/<profile>`, baseline `sam2-predictor`):
the same weights and the same synthetic angiography frames, written as JPEG for the predictor
(it reads JPEG folders) and decoded with PIL for the Tracker. The predictor gets the boxes on
frame 0 and runs `propagate_in_video`; the Tracker gets the same boxes and `step`s, once per
precision and profile (`exact`: sam2's memory selection; `fast`: README "Tracking profiles").
One frame of each runs in turn (the predictor's generator advanced by one frame, then each
Tracker on that frame), so all see the same load; frame 0 (prompt) and frame 1 are warm-up.
Hole filling is off on both sides (a pip-installed sam2 has no `sam2._C`, so the predictor
skips it). Fidelity: mean / min mask IoU against the predictor, and for int8 against the fp32
Tracker of the same profile.

Weights: SAM2.1-tiny at 1024 and 512 random-init (with the presence bias, so regions are
present; speed and fidelity only, on cine seed 3), and the trained demo SAM2 (micro@256,
`rau_rt/weights`) on held-out cine 101 of the accuracy benchmark, where every case also
carries Dice against the generator's exact truth (`task`: segments >= 2 mm, frames after the
prompt; regions spread over the calibres) and its change against `exact`, so a profile's
speed is read beside what it costs.

CPU (default): tiny@1024 1 and 3 regions, tiny@512 and micro@256 (trained) 1, 3 and 8 regions,
ONNX Runtime fp32 and int8 bundles (`rau-rt export sam2 --precision int8`; graphs whose int8
drift was over tolerance stay fp32 and the record says which). GPU (`--device cuda`): tiny at
1024, the torch CUDA backend (eager graphs, fp32 and fp16) vs the predictor on the same GPU
(`python -m benchmarks.gpu_check` is the full GPU check). `--quick`: the trained micro@256 at 3
and 8 regions. `--run tiny@512 --regions 3` measures one run at chosen region counts;
`--memory-pool 2` adds each profile with pooled memory tokens (`exact+pool-2`,
`fast+pool-2+window-0`; README "Memory token pooling"), which on random-init weights says what
pooling saves, not what it costs;
`--memory-window K` adds each profile whose window lever is not K with it (`exact+window-3`,
`fast+window-0`: `fast` without its window; README "Windowed memory attention"). Every case
that windows records the share of its tracked region-frames that ran windowed (on random-init
weights masks are noise, so that share says whether the timing measured windows at all).

Memory: the micro model at 256; RSS of a Tracker (ONNX Runtime bundle) over 10,000 frames (the
clip's frames cycled) and of the predictor over a 300-frame clip (it loads every frame up front
and keeps every frame's outputs); MiB per 1,000 frames for both. Time to first mask on a
300-frame source: the Tracker's first `step` vs the predictor's `init_state` + box + first frame.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_accuracy import HELD_OUT, write_jpegs
from benchmarks.harness import case_record, markdown, reproduce_command, write_record
from rau_rt.bundle import load_bundle
from rau_rt.commands.demo import SHIPPED_SAM2, SHIPPED_SAM2_CONFIG
from rau_rt.config import EngineConfig
from rau_rt.export.sam2 import Sam2ExportConfig, export_sam2
from rau_rt.export.sam2.graphs import EagerGraphs
from rau_rt.export.sam2.inputs import CheckFrames
from rau_rt.export.sam2.model import ModelSource, load_model
from rau_rt.synthetic import generate_sequence
from rau_rt.synthetic.scoring import Scorecard
from rau_rt.tracking import Tracker, TrackerConfig
from rau_rt.tracking.tracker import PROFILES

SUITE = "tracker"
BASELINE = "sam2-predictor"
WARMUP = 2  # frame 0 (the prompt) and frame 1; on a GPU 5 (kernel selection, allocator growth)


@dataclasses.dataclass(frozen=True)
class Run:
    model: str
    image_size: int
    frames: int
    regions: tuple[int, ...] = (1, 3)
    trained: bool = False  # the demo weights on a held-out cine, scored against truth


RUNS = {
    "full": (Run("tiny", 1024, 14), Run("tiny", 512, 24, (1, 3, 8)),
             Run(SHIPPED_SAM2_CONFIG, 256, 40, (1, 3, 8), trained=True)),
    "quick": (Run(SHIPPED_SAM2_CONFIG, 256, 24, (3, 8), trained=True),),
    "cuda": (Run("tiny", 1024, 40),),
}
PROFILE_NAMES = ("exact", "fast")
TRAINED_CINE = HELD_OUT[0]  # seed 101, left coronary: 16 segments once filled


@dataclasses.dataclass
class Clip:
    """Frames both sides read, the prompt boxes, and (trained runs) the truth to score."""

    video: Path
    images: list[np.ndarray]
    boxes: list[np.ndarray]
    names: list[str]
    sequence: object | None = None
    start: int = 0  # sequence frame of clip frame 0


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_clip(directory: Path, size: int, frames: int, regions: int,
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """JPEG frames of a contrast-filled synthetic cine and the boxes of its largest segments."""
    sequence = generate_sequence(seed=3, frames=frames + 10, size=size, contrast_delay_frames=1)
    images = write_jpegs(directory, sequence.frames_8bit()[10:])
    truth = sequence.truth[10].segments.values()
    boxes = sorted((s.box for s in truth if s.present and s.box),
                   key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    if len(boxes) < regions:
        raise ValueError(f"cine seed 3 shows {len(boxes)} segments, {regions} asked for")
    return images, [np.asarray(b, np.float32) for b in boxes[:regions]]


def held_out_clip(directory: Path, frames: int, regions: int) -> Clip:
    """The trained run's clip: held-out cine 101 from the first frame where every segment
    shows, with the truth boxes of `regions` segments spread over the calibres (the largest
    first)."""
    c = TRAINED_CINE
    sequence = generate_sequence(seed=c.seed, frames=frames + 30, size=512, fps=15.0,
                                 artery=c.artery, dominance=c.dominance, stenoses=c.stenoses,
                                 look=c.look)
    counts = [sum(bool(s.present and s.box) for s in t.segments.values())
              for t in sequence.truth]
    start = counts.index(max(counts))
    if start + frames > len(sequence.truth):
        raise ValueError(f"cine {c.seed} fills at frame {start}: {frames} frames do not fit")
    shown = [n for n, s in sequence.truth[start].segments.items() if s.present and s.box]
    if regions > len(shown):
        raise ValueError(f"cine {c.seed} shows {len(shown)} segments, {regions} asked for")
    by_calibre = sorted(shown, key=lambda n: -sequence.meta.diameters_mm[n])
    names = [by_calibre[int(i)] for i in np.round(np.linspace(0, len(shown) - 1, regions))]
    images = write_jpegs(directory, sequence.frames_8bit()[start:start + frames])
    boxes = [np.asarray(sequence.truth[start].segments[n].box, np.float32) for n in names]
    return Clip(directory, images, boxes, names, sequence, start)


def dice_card(clip: Clip, masks: list[np.ndarray]) -> Scorecard:
    """The tracked masks (frames after the prompt) scored against the cine's exact truth."""
    card = Scorecard()
    diameters = clip.sequence.meta.diameters_mm
    for i, got in enumerate(masks[1:], start=1):
        truth = clip.sequence.truth[clip.start + i]
        for k, name in enumerate(clip.names):
            card.add(name, got[k], truth.segments[name], truth, got[k].shape, diameters[name])
    return card


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def predictor_frames(model, video: Path, boxes, device: str):
    """A generator: one predictor frame per `next`, yielding (masks (regions, H, W) bool, ms)."""
    with torch.inference_mode(), warnings.catch_warnings(), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        state = model.init_state(str(video))
        for k, box in enumerate(boxes):
            model.add_new_points_or_box(state, frame_idx=0, obj_id=k, box=box)
        frames = model.propagate_in_video(state)
        while True:
            started = time.perf_counter()
            try:
                _, _, masks = next(frames)
            except StopIteration:
                return
            _sync(device)
            yield (masks[:, 0] > 0).cpu().numpy(), (time.perf_counter() - started) * 1e3


def tracker_frames(tracker: Tracker, images, boxes, device: str):
    names = [f"r{k}" for k in range(len(boxes))]
    tracker.prompt(0, dict(zip(names, boxes, strict=True)))
    for image in images:
        started = time.perf_counter()
        step = tracker.step(image)
        _sync(device)
        ms = (time.perf_counter() - started) * 1e3
        yield np.stack([step.regions[n].mask if step.regions[n].present
                        else np.zeros(step.frame_size, bool) for n in names]), ms, step


def compare_run(predictor, trackers: dict[str, Tracker], video: Path, images, boxes,
                device: str) -> dict[str, dict]:
    """Interleave the predictor and every tracker frame by frame; samples and masks per entry."""
    runs: dict[str, object] = {BASELINE: predictor_frames(predictor, video, boxes, device)}
    runs.update({name: tracker_frames(t, images, boxes, device) for name, t in trackers.items()})
    out = {name: {"ms": [], "masks": [], "stage_ms": [], "windowed": []} for name in runs}
    try:
        for _ in images:
            for name, frames in runs.items():
                got = next(frames)
                out[name]["ms"].append(got[1])
                out[name]["masks"].append(got[0])
                if len(got) > 2:
                    out[name]["stage_ms"].append(dict(got[2].stage_ms))
                    out[name]["windowed"].append(len(got[2].windowed))
    finally:  # a suspended predictor holds stderr redirected: an error would print nowhere
        for frames in runs.values():
            frames.close()
    return out


def _ious(a: list[np.ndarray], b: list[np.ndarray]) -> list[float]:
    return [iou(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in range(len(x))]


def _stages(samples: list[dict], warmup: int) -> dict[str, float]:
    kept = samples[warmup:]
    return {k: round(float(np.median([s[k] for s in kept])), 2) for k in kept[0]}


def settings(memory_pool: int = 1, memory_window: int | None = None
             ) -> dict[str, TrackerConfig]:
    """Each profile, hole filling off; with `memory_pool` > 1 also each profile with its
    memory tokens pooled (`<profile>+pool-<k>`: the bundle's `memory_attention_pooled`; a
    profile that windows gets `+window-0`, as pooling does not combine with windows); with
    `memory_window` k each profile whose window is not k with that window
    (`<profile>+window-<k>`; k = 0 turns a profile's window off)."""
    out = {p: TrackerConfig(fill_hole_area=0, profile=p) for p in PROFILE_NAMES}
    if memory_pool > 1:
        out |= {f"{p}+pool-{memory_pool}" + ("+window-0" if PROFILES[p][4] else ""):
                TrackerConfig(fill_hole_area=0, profile=p, memory_pool=memory_pool,
                              memory_window=0)
                for p in PROFILE_NAMES}
    if memory_window is not None:
        out |= {f"{p}+window-{memory_window}": TrackerConfig(
                    fill_hole_area=0, profile=p, memory_window=memory_window)
                for p in PROFILE_NAMES if PROFILES[p][4] != memory_window}
    return out


def latency_cases(run: Run, workdir: Path, device: str, backend: str,
                  precisions: tuple[str, ...], cuda_graph: bool = False,
                  memory_pool: int = 1, memory_window: int | None = None
                  ) -> tuple[list[dict], dict]:
    """Cases of one run (module docstring); `cuda_graph`: the torch backend's engines capture
    CUDA graphs (`EngineConfig.cuda_graph`), recorded in the backend's name; `memory_pool`,
    `memory_window`: pooled or windowed settings beside the profiles (`settings`)."""
    source = (ModelSource(image_size=run.image_size, checkpoint=SHIPPED_SAM2, config=run.model)
              if run.trained else ModelSource(image_size=run.image_size, random_init=run.model))
    facts: dict[str, object] = {"model": run.model, "image_size": run.image_size,
                                "weights": str(SHIPPED_SAM2) if run.trained else "random-init"}
    if backend == "onnxruntime":
        out = workdir / f"{run.model}_{run.image_size}{'_trained' if run.trained else ''}"
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            manifest, _ = export_sam2(Sam2ExportConfig(source, out, precision="int8"),
                                      CheckFrames.synthetic(generate_sequence, regions=2))
        facts["export_s"] = round(time.perf_counter() - started, 1)
        facts["int8_graphs"] = {g: manifest.entries(g)[0].precision
                                for g in manifest.graph_names}
        # no spin-waiting: spinning ORT threads would slow the predictor's frame after ours
        bundles = {"fp32": load_bundle(out, config=EngineConfig(precision="fp32",
                                                                spin_wait=False)),
                   # each graph's first entry: int8 where accepted
                   "int8": load_bundle(out, config=EngineConfig(spin_wait=False))}
    else:
        bundles = {p: EagerGraphs(load_model(source), EngineConfig(
                       device=device, precision=p, cuda_graph=cuda_graph)) for p in precisions}
        if cuda_graph:
            backend = "torch-cuda-graphs"
    cases = []
    warmup = WARMUP if device == "cpu" else 5
    predictor = load_model(source)
    predictor.fill_hole_area = 0
    if device != "cpu":
        predictor = predictor.to(device)
    for regions in run.regions:
        video = workdir / f"clip_{run.model}_{run.image_size}_{regions}"
        if run.trained:
            clip = held_out_clip(video, run.frames, regions)
        else:
            images, boxes = write_clip(video, run.image_size, run.frames, regions)
            clip = Clip(video, images, boxes, [f"r{k}" for k in range(len(boxes))])
        trackers = {f"{p}/{name}": Tracker(bundles[p], config)
                    for p in precisions
                    for name, config in settings(memory_pool, memory_window).items()}
        result = compare_run(predictor, trackers, video, clip.images, clip.boxes, device)
        theirs = np.asarray(result[BASELINE]["ms"][warmup:])
        dice = {}
        if run.trained:
            dice = {name: dice_card(clip, result[name]["masks"]).summary()["dice_ge2mm"]
                    for name in result}
        for name in trackers:
            precision, setting = name.split("/")
            ours = result[name]
            fidelity = {"iou_vs_predictor_mean": float(np.mean(_ious(
                            ours["masks"], result[BASELINE]["masks"]))),
                        "iou_vs_predictor_min": float(np.min(_ious(
                            ours["masks"], result[BASELINE]["masks"]))),
                        "stage_ms": _stages(ours["stage_ms"], warmup)}
            if precision != "fp32":
                fidelity["iou_vs_fp32_mean"] = float(np.mean(_ious(
                    ours["masks"], result[f"fp32/{setting}"]["masks"])))
            case = case_record(
                f"{run.model}@{run.image_size}/{regions}r/{name}", f"{backend}-{device}",
                precision, np.asarray(ours["ms"][warmup:]), BASELINE, theirs, fidelity)
            case["profile"] = trackers[name].config.profile
            case["memory_pool"] = trackers[name].config.levers[3]
            if trackers[name].config.levers[4]:
                # tracked region-frames after warm-up that ran windowed
                tracked = regions * (len(ours["windowed"]) - warmup)
                case["memory_window"] = trackers[name].config.levers[4]
                case["windowed_fraction"] = sum(ours["windowed"][warmup:]) / max(tracked, 1)
            if run.trained:
                case["task"] = {"dice_ge2mm": dice[name], "dice_ge2mm_predictor": dice[BASELINE],
                                "dice_change_vs_exact": dice[name] - dice[f"{precision}/exact"],
                                "regions": clip.names, "cine": TRAINED_CINE.seed}
            cases.append(case)
            print(json.dumps(cases[-1]), flush=True)
    for bundle in bundles.values():
        bundle.close()
    return cases, facts


def memory_run(workdir: Path, tracker_frames_n: int, predictor_frames_n: int) -> dict:
    """RSS growth of the Tracker over a long stream and of the predictor over a clip."""
    source = ModelSource(image_size=256, random_init="micro")
    model = load_model(source)
    model.fill_hole_area = 0
    video = workdir / "long_clip"
    images, boxes = write_clip(video, 256, predictor_frames_n, 1)
    out = workdir / "micro_256"
    with contextlib.redirect_stderr(io.StringIO()):
        export_sam2(Sam2ExportConfig(source, out),
                    CheckFrames.synthetic(generate_sequence, regions=2))
    bundle = load_bundle(out, config=EngineConfig(spin_wait=False))
    # time to first mask on a 300-frame source (the bundle is loaded, as in a running tower)
    started = time.perf_counter()
    tracker = Tracker(bundle, TrackerConfig(fill_hole_area=0))
    tracker.prompt(0, {"r0": boxes[0]})
    tracker.step(images[0])
    first_tracker_ms = (time.perf_counter() - started) * 1e3
    marks = sorted({100, 1000, tracker_frames_n} & set(range(1, tracker_frames_n + 1)))
    rss = {}
    for t in range(1, tracker_frames_n):
        tracker.step(images[t % len(images)])
        if t + 1 in marks:
            gc.collect()
            rss[t + 1] = rss_mib()
    del tracker
    bundle.close()
    gc.collect()
    base = rss_mib()
    with torch.inference_mode(), warnings.catch_warnings(), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        state = model.init_state(str(video))
        loaded = rss_mib()
        model.add_new_points_or_box(state, frame_idx=0, obj_id=0, box=boxes[0])
        frames = model.propagate_in_video(state)
        next(frames)
        first_predictor_ms = (time.perf_counter() - started) * 1e3
        predictor_rss = {1: rss_mib()}
        held = {1: state_mib(state)}
        for t, _ in enumerate(frames, start=2):
            if t in (100, predictor_frames_n):
                gc.collect()
                predictor_rss[t] = rss_mib()
                held[t] = state_mib(state)
    start = marks[1] if len(marks) > 2 else marks[0]  # frame 1,000 on a long stream
    ours_growth = (rss[marks[-1]] - rss[start]) / (marks[-1] - start) * 1000
    # the predictor's growth from the tensors its state holds: its RSS reuses the pages the
    # tracker run freed, so RSS alone shows nothing for a few hundred small frames
    theirs_growth = (held[predictor_frames_n] - held[100]) / (predictor_frames_n - 100) * 1000
    return {
        "config": "micro@256/1r", "tracker_frames": tracker_frames_n,
        "tracker_rss_mib": rss, "tracker_mib_per_1000_frames": round(ours_growth, 2),
        "tracker_growth_1000_to_last_pct": round(
            100 * (rss[marks[-1]] - rss[start]) / rss[start], 3),
        "predictor_frames": predictor_frames_n, "predictor_rss_mib": predictor_rss,
        "predictor_state_mib": {k: round(v, 2) for k, v in held.items()},
        "predictor_loaded_up_front_mib": round(loaded - base, 1),
        "predictor_mib_per_1000_frames": round(theirs_growth, 2),
        "first_mask_ms": {"tracker": round(first_tracker_ms, 1),
                          "predictor_init_state_box_first_frame": round(first_predictor_ms, 1)},
    }


def state_mib(state: dict) -> float:
    """MiB of tensors the predictor's inference_state holds (frames, features, outputs)."""
    seen: set[int] = set()

    def walk(value) -> int:
        if isinstance(value, torch.Tensor):
            if value.data_ptr() in seen:
                return 0
            seen.add(value.data_ptr())
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(walk(v) for v in value)
        return 0

    return walk(state) / 2**20


def summary(record: dict) -> str:
    """Lines under the README table: Dice of the trained cases, memory, time to first mask."""
    parts = []
    trained = [c for c in record.get("cases", []) if c.get("task")]
    if trained:
        task = trained[0]["task"]
        lines = [f"Dice against exact truth (trained demo SAM2, held-out cine {task['cine']}, "
                 "segments >= 2 mm, frames after the prompt) beside the same case's speed:", "",
                 "| case | ms/frame | vs predictor | Dice | vs exact | predictor's Dice |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {c['case']} | {c['median_ms']:.1f} | {c['speedup']:.2f}x | "
                  f"{c['task']['dice_ge2mm']:.3f} | {c['task']['dice_change_vs_exact']:+.3f} | "
                  f"{c['task']['dice_ge2mm_predictor']:.3f} |" for c in trained]
        parts.append("\n".join(lines))
    m = record.get("memory")
    if m:
        parts.append(memory_summary(m))
    return "\n\n".join(parts)


def memory_summary(m: dict) -> str:
    return (f"Memory ({m['config']}): Tracker {m['tracker_mib_per_1000_frames']} MiB per 1,000 "
            f"frames over {m['tracker_frames']:,} frames ({m['tracker_growth_1000_to_last_pct']}"
            f" % from frame 1,000 (100 when shorter) to the last); predictor "
            f"{m['predictor_mib_per_1000_frames']} MiB per 1,000 frames (tensors its state holds) "
            "over "
            f"{m['predictor_frames']} frames plus {m['predictor_loaded_up_front_mib']} MiB "
            f"loaded up front. First mask on a {m['predictor_frames']}-frame source: Tracker "
            f"{m['first_mask_ms']['tracker']} ms, predictor "
            f"{m['first_mask_ms']['predictor_init_state_box_first_frame']} ms (init_state "
            "loads every frame first).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the trained micro model at 3 and 8 regions (a few minutes)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default=None,
                        help="onnxruntime: exported bundles (CPU default); torch: the eager "
                             "graphs (CUDA default)")
    parser.add_argument("--frames", type=int, default=None, help="frames per latency case")
    parser.add_argument("--stream-frames", type=int, default=10_000,
                        help="frames of the Tracker's memory run (0: skip the memory run)")
    parser.add_argument("--json", default=None, help="where to write the JSON record")
    parser.add_argument("--memory-only", action="store_true",
                        help="rerun the memory part and update the existing record's")
    parser.add_argument("--run", default=None, metavar="CONFIG@SIZE",
                        help="only this run of the mode's (e.g. tiny@512)")
    parser.add_argument("--regions", default=None, metavar="N,N",
                        help="region counts instead of the run's (e.g. 3)")
    parser.add_argument("--memory-pool", type=int, choices=(1, 2), default=1,
                        help="2: each profile also with pooled memory tokens "
                             "(`<profile>+pool-2`)")
    parser.add_argument("--memory-window", type=int, default=None, metavar="K",
                        help="each profile whose window is not K also with K windowed frames "
                             "(`<profile>+window-K`; 0: the window off)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    runs = RUNS["cuda" if cuda else "quick" if args.quick else "full"]
    if args.run:
        runs = tuple(r for r in runs if f"{r.model}@{r.image_size}" == args.run)
        if not runs:
            parser.error(f"--run {args.run}: not a run of this mode")
    if args.regions:
        counts = tuple(int(n) for n in args.regions.split(","))
        runs = tuple(dataclasses.replace(r, regions=counts) for r in runs)
    backend = args.backend or ("torch" if cuda else "onnxruntime")
    if backend == "onnxruntime" and cuda:
        parser.error("on CUDA this benchmark runs the torch backend (onnxruntime-gpu is not in "
                     "the CPU stack)")
    precisions = ("fp32", "fp16") if cuda else ("fp32", "int8") if backend == "onnxruntime" \
        else ("fp32",)
    default = "benchmarks/results/" + ("tracker_cuda.json" if cuda else "tracker_cpu.json")
    if args.memory_only:
        path = Path(args.json or default)
        record = json.loads(path.read_text())
        with tempfile.TemporaryDirectory(prefix="bench_tracker_") as tmp:
            record["memory"] = memory_run(Path(tmp), 1000 if args.quick else args.stream_frames,
                                          150 if args.quick else 300)
        record["summary_md"] = summary(record)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(record["summary_md"])
        return 0
    cases, facts = [], []
    with tempfile.TemporaryDirectory(prefix="bench_tracker_") as tmp:
        memory = None
        if args.stream_frames and not cuda:
            # first, while the process holds nothing else: RSS after the 1024 px runs moves
            # with the allocator's fragmentation, not with the tracker
            memory = memory_run(Path(tmp), 1000 if args.quick else args.stream_frames,
                                150 if args.quick else 300)
        for run in runs:
            if args.frames:
                run = dataclasses.replace(run, frames=args.frames)
            run_cases, run_facts = latency_cases(run, Path(tmp), args.device, backend,
                                                 precisions, memory_pool=args.memory_pool,
                                                 memory_window=args.memory_window)
            cases += run_cases
            facts.append(run_facts)
    command = reproduce_command("bench_tracker", args, parser.parse_args([]))
    extra = {"torch_threads": torch.get_num_threads()}
    if cuda:
        extra["gpu"] = torch.cuda.get_device_name()
    record = write_record(SUITE, cases, args.json or default, command, **extra)
    record.update(runs=facts, memory=memory)
    record["summary_md"] = summary(record)
    Path(args.json or default).write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
