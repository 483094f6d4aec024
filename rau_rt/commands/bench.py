"""`rau-rt bench`: the pipeline's latency on this box, as a user measures it before deployment.

Runs a pipeline bundle over a source (default: a synthetic angiography cine and its reference)
as a live stream: the tracker never waits for the VLM, which runs on keyframes in its worker.
Back to back by default (the throughput the box sustains), or paced at `--realtime FPS` with
the newest frame winning (what a live feed of that rate gets, dropped frames counted).
Reports per-stage and end-to-end p50/p90/p99/max, jitter (p90 - p10), tail (max - p95), the
deadline-miss rate at the source's frame interval, peak RSS and GPU memory, with the device,
backends, precisions and versions that produced them: bench.json, bench.md, latency.png,
stages.png in `--out`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rau_rt import load_reference
from rau_rt.commands import run as run_command
from rau_rt.commands.demo import DEMO_REGIONS
from rau_rt.errors import InputError
from rau_rt.io.sources import SyntheticSource, open_source
from rau_rt.pipeline import KeyframeConfig, PipelineConfig, open_pipeline

DEFAULT_SOURCE = "synthetic:seed=0&size=512&fps=15&frames={frames}"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="pipeline bundle folder")
    parser.add_argument("--source", default=None,
                        help="any rau-rt source (default: a synthetic 512 px cine at 15 fps)")
    parser.add_argument("--reference", type=Path, default=None, nargs="+",
                        help="reference annotation JSON, one or several views (default for "
                        "synthetic: sources: the generator's reference)")
    parser.add_argument("--regions", default=None,
                        help="comma-separated regions (default: all annotated; for a "
                        "synthetic source without --reference: the demo's "
                        f"{','.join(DEMO_REGIONS)})")
    parser.add_argument("--frames", type=int, default=120, help="frames to time (default 120)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="first frames left out of the statistics (default 5)")
    parser.add_argument("--realtime", type=float, default=None, metavar="FPS",
                        help="pace the source at FPS, newest frame wins (default: back to back)")
    parser.add_argument("--view-similarity", type=float, default=None,
                        help="keyframe when the frame's pooled encoder features fall below "
                        "this cosine similarity to the last keyframe's (default off; "
                        "uncalibrated, see README)")
    parser.add_argument("--keyframe-every", type=int, default=KeyframeConfig().every,
                        help="VLM keyframe schedule in frames")
    run_command.add_localize_argument(parser)
    parser.add_argument("--out", type=Path, default=Path("rau-rt-bench"),
                        help="output folder (default ./rau-rt-bench)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    run_command.add_engine_arguments(parser)


def gpu_memory(device: str) -> dict[str, object]:
    """Peak GPU memory of this process where it can be read (the torch backend)."""
    if not device.startswith("cuda"):
        return {"peak_mib": None, "note": "CPU run"}
    try:
        import torch

        if torch.cuda.is_available():
            return {"peak_mib": torch.cuda.max_memory_allocated() / (1 << 20),
                    "note": "torch.cuda.max_memory_allocated (torch backend allocations only)"}
    except ImportError:
        pass
    return {"peak_mib": None, "note": "not measured: no torch CUDA in this process (ONNX "
            "Runtime/TensorRT allocations are not visible from Python); use nvidia-smi"}


def run(args: argparse.Namespace) -> int:
    if args.frames < 1 or args.warmup < 0 or args.warmup >= args.frames:
        raise InputError(f"--frames {args.frames} / --warmup {args.warmup}: expected frames >= 1 "
                         "and 0 <= warmup < frames")
    if args.realtime is not None and args.realtime <= 0:
        raise InputError(f"--realtime FPS must be > 0, got {args.realtime}")
    uri = args.source or DEFAULT_SOURCE.format(frames=args.frames)
    source = open_source(uri)
    with source:
        if args.reference is not None:
            reference = [load_reference(path) for path in args.reference]
        elif isinstance(source, SyntheticSource):
            reference = run_command.synthetic_reference(source)
        else:
            raise InputError(f"--source {uri}: give its --reference (only synthetic: sources "
                             "bring their own)")
        regions = [r.strip() for r in args.regions.split(",")] if args.regions else None
        if regions is None and args.reference is None:
            regions = list(DEMO_REGIONS)  # the generator's reference marks every segment
        config = PipelineConfig(KeyframeConfig(every=args.keyframe_every,
                                               view_similarity=args.view_similarity),
                                realtime=args.realtime is not None)
        sam2_engine, vlm_engine = run_command.engine_configs(args)
        with open_pipeline(args.bundle, reference, regions, config, backend=args.backend,
                           engine=sam2_engine, vlm_engine=vlm_engine,
                           tracker=run_command.tracker_config(args),
                           localize=run_command.localize(args)) as pipeline:
            profile, wall, interrupted = run_command.stream(
                pipeline, source, [], max_frames=args.frames, fps=args.realtime,
                progress=not args.quiet, desc="bench")
            record = run_command.summarize(
                pipeline, profile, wall, command=run_command.command_line(args), source=source,
                fps=args.realtime or source.fps, warmup=args.warmup, interrupted=interrupted,
                extra={"suite": "rau-rt bench", "mode": "realtime" if args.realtime
                       else "back to back", "gpu_memory": gpu_memory(args.device)})
    args.out.mkdir(parents=True, exist_ok=True)
    paths = run_command.write_report(args.out, record, profile, "rau-rt bench", stem="bench")
    run_command.print_summary(record, paths)
    return 0
