"""`rau-rt demo`: the whole job on built-in defaults, on this machine, in about a minute.

1. A pipeline bundle: the shipped demo models (`rau_rt/weights/`, trained on synthetic cines
   only): SAM2 micro at 256 px (`rau-rt train sam2`) and, once its weights ship, the
   localizer, a micro Qwen2.5-VL at 224 px with aspect buckets (`rau-rt train vlm`; until then
   a random-init Qwen2.5-VL tiny at 224 px), exported and verified like any bundle, built once
   into the user cache dir and reused (or exported from `--sam2-checkpoint` / `--vlm`, random
   weights with `--random-init`, or taken from `--bundle`).
2. A synthetic coronary angiography cine (12-bit multi-frame XA DICOM) and an annotated
   reference still of another patient in another view (reference.png + reference.json).
3. The full pipeline over the DICOM file replayed as a live feed at its frame rate: the VLM on
   keyframes in its worker, SAM2 tracking every frame, late frames dropped and counted.
   SAM2 tracks with the `fast` profile (`--profile exact` for sam2's memory selection).
4. results.jsonl, overlay.mp4, summary.json/.md, latency.png, stages.png, a latency table, and
   the accuracy against the cine's exact truth (Dice, presence) with truth_vs_prediction.png;
   `bundle` links to the bundle it ran, for the README's Python example.

With keyframe localization on, the VLM finds the segments on keyframes and its boxes prompt
SAM2, which tracks them in between; the summary scores both against the cine's truth (the
keyframe answers' box hit rate, the masks' Dice). By default (`--localize auto`) it is on when
the VLM is fit to prompt SAM2: real weights (`--vlm`, `--bundle`), or the shipped demo VLM
once its record says it meets the localizer's accuracy goal (box hit rate >= 0.6 on segments
>= 3 mm, `VLM_GOAL`). Otherwise (random weights, or shipped weights below the goal) SAM2
follows the segments from the annotated reference's memory alone, and `--localize on` runs the
VLM anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from rau_rt import load_reference
from rau_rt._version import __version__
from rau_rt.commands import run as run_command
from rau_rt.errors import InputError
from rau_rt.io.outdir import claim_output
from rau_rt.pipeline import KeyframeConfig, PipelineConfig, open_pipeline
from rau_rt.pipeline.factory import SAM2_PART, VLM_PART, PipelineBundle

DEMO_REGIONS = ("5", "6", "7", "11")  # left main, LAD proximal and mid, proximal circumflex
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED_SAM2 = WEIGHTS / "sam2_micro256.safetensors"
SHIPPED_SAM2_CONFIG = "micro"  # the architecture the shipped weights fit
SHIPPED_VLM = WEIGHTS / "vlm_micro.safetensors"
DEMO_NOTE = ("{models}: the project's demo weights, trained on synthetic angiography only "
             "(rau_rt/weights/*.json): not for clinical use.")
UNTRAINED = ("NOTE: random (untrained) weights (--random-init): masks and boxes are "
             "meaningless; the latency is what this machine does with these model sizes.")
UNTRAINED_VLM = ("VLM: random weights ({why}): keyframe localization is off; SAM2 follows the "
                 "regions from the reference's memory. --localize on runs it anyway (latency "
                 "only: its boxes are noise).")
VLM_GOAL = 0.6  # the demo VLM's box hit rate (IoU >= 0.5, segments >= 3 mm) to prompt SAM2
BELOW_GOAL = ("VLM: the shipped demo VLM is below its accuracy goal (held-out box hit rate {hit} "
              "on segments >= 3 mm, goal {goal}): keyframe localization is off, SAM2 follows "
              "the regions from the reference's memory. --localize on runs it anyway.")


def shipped_vlm_hit_rate() -> float | None:
    """The shipped demo VLM's held-out box hit rate on segments >= 3 mm, from its record
    (`benchmarks.bench_accuracy --suite localizer`, fp32); None when not recorded."""
    record = SHIPPED_VLM.with_suffix(".json")
    if not record.is_file():
        return None
    accuracy = json.loads(record.read_text()).get("accuracy", {})
    return accuracy.get("hit_rate_ge3mm")


def cache_root() -> Path:
    """Where built bundles are kept: $RAU_RT_CACHE, else $XDG_CACHE_HOME/rau-rt, else
    ~/.cache/rau-rt."""
    if os.environ.get("RAU_RT_CACHE"):
        return Path(os.environ["RAU_RT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rau-rt"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("rau-rt-demo"),
                        help="output folder (default ./rau-rt-demo)")
    parser.add_argument("--frames", type=int, default=60, help="cine length (default 60)")
    parser.add_argument("--size", type=int, default=512, help="cine frame side (default 512)")
    parser.add_argument("--fps", type=float, default=15.0, help="cine frame rate: 7.5, 15, 30")
    parser.add_argument("--seed", type=int, default=0, help="synthetic patient and view")
    parser.add_argument("--regions", default=",".join(DEMO_REGIONS),
                        help=f"ARCADE segments to follow (default {','.join(DEMO_REGIONS)})")
    parser.add_argument("--keyframe-every", type=int, default=15,
                        help="VLM keyframe schedule in frames (default 15)")
    parser.add_argument("--offline", action="store_true",
                        help="process every frame back to back, keyframe answers on the next "
                        "frame (default: replay as a live feed at --fps)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="use this pipeline bundle instead of building one")
    parser.add_argument("--sam2-checkpoint", type=Path, default=None,
                        help="export SAM2 from this sam2.1_hiera_*.pt (with --sam2-config)")
    parser.add_argument("--sam2-config", default=None,
                        help="the checkpoint's config: tiny, small, base_plus, large")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights (SAM2 micro, Qwen2.5-VL tiny) instead of the "
                             "shipped demo weights")
    parser.add_argument("--localize", choices=("auto", "on", "off"), default="auto",
                        help="VLM keyframes: auto = on for real VLM weights (--vlm, --bundle) "
                             "and for the shipped demo VLM once it meets its accuracy goal; "
                             "off for random weights")
    parser.add_argument("--image-size", type=int, default=None,
                        help="SAM2 input side (default 256 for micro, 512 --sam2-checkpoint)")
    parser.add_argument("--vlm", type=Path, default=None,
                        help="export the VLM from this Hugging Face Qwen2.5-VL folder")
    parser.add_argument("--vlm-input-size", type=int, default=None,
                        help="VLM input side (default 224, 448 with --vlm)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="bundle cache folder (default $RAU_RT_CACHE or ~/.cache/rau-rt)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached bundle")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    run_command.add_engine_arguments(parser)
    # the demo tracks with `fast`: on the trained demo SAM2 it is no less accurate than `exact`
    # on the held-out cines and keeps the live demo within its 40 ms (README "Tracking profiles")
    parser.set_defaults(profile="fast")


def _bundle_spec(args: argparse.Namespace) -> dict[str, object]:
    """What the demo bundle is built from: its cache key."""
    if (args.sam2_checkpoint is None) != (args.sam2_config is None):
        raise InputError("--sam2-checkpoint and --sam2-config go together")
    if args.sam2_checkpoint is not None and args.random_init:
        raise InputError("--random-init and --sam2-checkpoint exclude each other")
    if args.sam2_checkpoint is not None:
        sam2 = {"checkpoint": str(args.sam2_checkpoint.resolve()), "config": args.sam2_config,
                "checkpoint_bytes": _size(args.sam2_checkpoint),
                "image_size": args.image_size or 512}
    elif args.random_init:
        sam2 = {"random_init": "micro", "image_size": args.image_size or 256}
    else:
        sam2 = {"checkpoint": str(SHIPPED_SAM2), "config": SHIPPED_SAM2_CONFIG,
                "checkpoint_sha256": _shipped_sha256(SHIPPED_SAM2),
                "image_size": args.image_size or 256}
    if args.vlm is not None:
        vlm = {"model": str(args.vlm.resolve()), "input_size": args.vlm_input_size or 448}
    elif args.random_init or not SHIPPED_VLM.is_file():
        vlm = {"random_init": "tiny", "input_size": args.vlm_input_size or 224}
    else:
        vlm = {"weights": str(SHIPPED_VLM), "size": "micro",
               "weights_sha256": _shipped_sha256(SHIPPED_VLM),
               "input_size": args.vlm_input_size or 224, "aspect_buckets": True}
    return {"rau_rt": __version__, "sam2": sam2, "vlm": vlm}


def _shipped_sha256(weights: Path) -> str:
    if not weights.is_file():
        raise InputError(f"the shipped demo weights {weights} are missing from this install; "
                         "reinstall rau-rt, or pass --random-init")
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def _size(path: Path) -> int:
    if not path.is_file():
        raise InputError(f"--sam2-checkpoint {path}: no such file")
    return path.stat().st_size


def build_bundle(spec: dict[str, object], out: Path, progress: bool = True) -> None:
    """Export and verify the pipeline bundle `spec` describes into `out` (needs [export])."""
    try:
        from rau_rt.export import sam2, vlm
        from rau_rt.export.sam2.inputs import CheckFrames
        from rau_rt.export.sam2.model import ModelSource
    except ImportError as exc:
        raise InputError(f"building the demo bundle needs the export extra ({exc.name} is "
                         "missing): pip install 'rau-rt[export]', or pass --bundle DIR") from exc
    from rau_rt.synthetic import generate_sequence

    s = spec["sam2"]
    source = (ModelSource(image_size=s["image_size"], random_init=s["random_init"])
              if "random_init" in s else
              ModelSource(image_size=s["image_size"], checkpoint=Path(s["checkpoint"]),
                          config=s["config"]))
    sam2.export_sam2(sam2.Sam2ExportConfig(source, out / SAM2_PART),
                     CheckFrames.synthetic(generate_sequence, regions=2))
    v = spec["vlm"]
    with tempfile.TemporaryDirectory(prefix="rau-rt-vlm-") as tmp:
        model = Path(v["model"]) if "model" in v else None
        if "weights" in v:  # the shipped fp16 weights into the Hugging Face folder they fit
            from rau_rt.train.vlm_trainer import restore

            model = restore(Path(v["weights"]), Path(tmp) / "model")
        vlm.export_vlm(vlm.VlmExportConfig(out=out / VLM_PART, model=model,
                                           random_init=v.get("random_init"),
                                           input_size=v["input_size"],
                                           aspect_buckets=v.get("aspect_buckets", False),
                                           progress=progress))
    (out / "demo.json").write_text(json.dumps(spec, indent=2) + "\n")


def cached_bundle(spec: dict[str, object], cache: Path, rebuild: bool,
                  progress: bool = True) -> tuple[Path, bool]:
    """The bundle for `spec` in `cache`, built if missing (atomically: a crash leaves no
    half-built bundle under the final name). Returns (folder, whether it was built now)."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    final = cache / f"demo-{__version__}-{key}"
    if final.exists() and not rebuild:
        PipelineBundle.find(final)  # complete? (else: BundleError naming what is missing)
        return final, False
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{final.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    build_bundle(spec, partial, progress)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final, True


def link_bundle(out: Path, bundle: Path) -> Path | None:
    """`out/bundle` -> the bundle the demo ran (a symbolic link, replaced on every run), so the
    README's Python example works as printed after `rau-rt demo`. A real folder of that name
    is left alone, and where links cannot be made there is none (None)."""
    link = out / "bundle"
    if link.exists() and not link.is_symlink():
        return None
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".bundle.link-{os.getpid()}"
    partial.unlink(missing_ok=True)
    try:
        partial.symlink_to(Path(bundle).resolve(), target_is_directory=True)
    except OSError:  # a file system without symbolic links: the summary names the bundle
        return None
    os.replace(partial, link)
    return link


def write_inputs(out: Path, frames: int, size: int, fps: float, seed: int,
                 regions: tuple[str, ...]):
    """The synthetic cine (XA DICOM) and reference (PNG + JSON) in `out`; returns their paths
    and the cine's `Sequence` (its truth scores the run)."""
    import cv2

    from rau_rt.io.annotations import write_reference_annotation
    from rau_rt.synthetic import formats, generate_sequence, make_reference

    sequence = generate_sequence(seed=seed, frames=frames, size=size, fps=fps,
                                 segments=regions)
    cine = out / "cine.dcm"
    formats.write_dicom(cine, sequence)
    reference = make_reference(seed, size, segments=regions, avoid_view=sequence.meta.view)
    cv2.imwrite(str(out / "reference.png"), reference.image_8bit())
    annotation = out / "reference.json"
    write_reference_annotation(annotation, "reference.png", (size, size), reference.regions)
    return cine, annotation, sequence


def run(args: argparse.Namespace) -> int:
    from rau_rt.io.sources import open_source

    if args.frames < 2:
        raise InputError(f"--frames must be >= 2, got {args.frames}")
    from rau_rt.io.truth import TruthSink

    regions = tuple(r.strip() for r in args.regions.split(",") if r.strip())
    shipped_vlm = args.bundle is None and args.vlm is None
    random_vlm = shipped_vlm and (args.random_init or not SHIPPED_VLM.is_file())
    hit = None if random_vlm or not shipped_vlm else shipped_vlm_hit_rate()
    fit = not shipped_vlm or (not random_vlm and hit is not None and hit >= VLM_GOAL)
    localize = args.localize == "on" or (args.localize == "auto" and fit)
    notes = []
    if args.random_init:
        notes.append(UNTRAINED)
    elif args.bundle is None and args.sam2_checkpoint is None:
        notes.append(DEMO_NOTE.format(models="SAM2 (micro, 256 px)" + (
            "" if random_vlm or args.vlm else " and the VLM (Qwen2.5-VL micro, 224 px)")))
    if not fit and not localize:
        notes.append(UNTRAINED_VLM.format(why="--random-init" if args.random_init else
                                          "no trained demo VLM ships yet") if random_vlm else
                     BELOW_GOAL.format(hit="unmeasured" if hit is None else f"{hit:.2f}",
                                       goal=VLM_GOAL))
    for note in notes:
        print(note)
    if args.bundle is not None:
        bundle = args.bundle
        PipelineBundle.find(bundle)
    else:
        bundle, built = cached_bundle(_bundle_spec(args), args.cache or cache_root(),
                                      args.rebuild, not args.quiet)
        print(f"bundle: {bundle} ({'built now' if built else 'reused from the cache'})")
    with claim_output(args.out):  # one run per --out at a time
        link = link_bundle(args.out, bundle)
        cine, annotation, sequence = write_inputs(args.out, args.frames, args.size, args.fps,
                                                  args.seed, regions)
        print(f"inputs: {cine} ({args.frames} frames {args.size}x{args.size}, 12-bit XA, "
              f"{args.fps:g} fps), reference {annotation}")
        reference = load_reference(annotation)
        config = PipelineConfig(KeyframeConfig(every=args.keyframe_every),
                                wait_for_localizer=args.offline, realtime=not args.offline)
        sam2_engine, vlm_engine = run_command.engine_configs(args)
        source = open_source(cine)
        truth = TruthSink(args.out / "truth_vs_prediction.png", sequence, regions)
        with source, open_pipeline(bundle, reference, regions, config, backend=args.backend,
                                   engine=sam2_engine, vlm_engine=vlm_engine,
                                   tracker=run_command.tracker_config(args),
                                   localize=localize) as pipeline:
            sinks = [*run_command.open_sinks(args.out, overlay=True, masks="none",
                                             dicom_seg=False), truth]
            profile, wall, interrupted = run_command.stream(pipeline, source, sinks,
                                                            progress=not args.quiet, desc="demo")
            keyframes = truth.keyframe_hits(pipeline.stats.answers)
            record = run_command.summarize(
                pipeline, profile, wall, command=run_command.command_line(args), source=source,
                fps=source.fps, interrupted=interrupted,
                extra={"notes": notes, "bundle": str(bundle),
                       "accuracy": truth.summary(), "localizer_accuracy": keyframes,
                       "outputs": {type(s).__name__: str(s.path) for s in sinks}})
        paths = run_command.write_report(args.out, record, profile, "rau-rt demo")
    run_command.print_summary(record, paths)
    print(f"overlay: {args.out / 'overlay.mp4'}, results: {args.out / 'results.jsonl'}"
          + (f", bundle: {link}" if link else ""))
    accuracy = truth.summary()
    print(f"accuracy against the cine's exact truth ({accuracy['frames']} segment-frames): "
          f"Dice {_num(accuracy['dice_mean'])} (segments >= 2 mm: "
          f"{_num(accuracy['dice_ge2mm'])}), presence {_num(accuracy['presence_acc'])}; "
          f"picture: {truth.path}")
    if keyframes["answers"]:
        print(f"localizer on {keyframes['answers']} keyframes: box hit rate (IoU >= 0.5) "
              f"{_num(keyframes['hit_rate'])} over {keyframes['visible']} visible segments, "
              f"mean IoU {_num(keyframes['mean_iou'])}, boxes where not visible "
              f"{keyframes['boxes_where_not_visible']} of {keyframes['not_visible']}")
    for note in notes:
        print(note)
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
