"""`rau-rt run`: a pipeline bundle + a reference + a source -> results, overlay and a summary.

Also the pieces `demo` and `bench` share: reading the reference, streaming a source through a
pipeline with a progress bar, describing what ran, and writing the summary (JSON, Markdown,
latency plot, per-stage chart).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import shlex
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from itertools import islice
from pathlib import Path

from rau_rt import load_reference, ops
from rau_rt._version import __version__
from rau_rt.errors import InputError, OutputError
from rau_rt.io import plots
from rau_rt.io.outdir import claim_output
from rau_rt.io.sinks import (
    BackgroundSink,
    DicomSegSink,
    JsonlSink,
    MaskArchiveSink,
    OverlayVideoSink,
    Sink,
)
from rau_rt.io.source import Source
from rau_rt.io.sources import SourceStalledError, SyntheticSource, open_source
from rau_rt.pipeline import KeyframeConfig, Pipeline, PipelineConfig, open_pipeline
from rau_rt.profiling import (
    RunProfile,
    cpu_model,
    latency_stats,
    markdown_table,
    package_version,
)
from rau_rt.reference import Reference
from rau_rt.tracking import TrackerConfig
from rau_rt.tracking.tracker import LEVERS, PROFILES
from rau_rt.types import Frame, FrameResult

PROGRESS_EVERY = 5  # frames between progress-bar statistics updates


# -- the reference -------------------------------------------------------------------------
def synthetic_reference(source: SyntheticSource) -> Reference:
    """The generator's annotated reference for a `synthetic:` source: another patient in
    another view, with every segment the source shows (what `rau-rt synth` writes)."""
    from rau_rt.synthetic import make_reference

    config = source.meta.config
    still = make_reference(config.seed, config.size, artery=config.artery,
                           dominance=config.dominance, segments=config.chosen_segments,
                           avoid_view=source.meta.view)
    return Reference(still.image_8bit(), still.regions, name=f"synthetic reference "
                     f"({still.view.name})")


# -- streaming --------------------------------------------------------------------------------
class ProgressSink:
    """A tqdm bar over a run: frames, fps, p50/p99 of the recent latencies, dropped frames."""

    def __init__(self, pipeline: Pipeline, profile: RunProfile, total: int | None,
                 desc: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.pipeline, self.profile = pipeline, profile
        self.bar = tqdm(total=total, desc=desc, unit="frame", disable=not enabled,
                        dynamic_ncols=True)
        self.started = time.perf_counter()

    def write(self, frame: Frame, result: FrameResult) -> None:
        # the bar counts source frames: processed and (realtime) dropped
        self.bar.update(len(self.profile) + self.pipeline.stats.frames_dropped - self.bar.n)
        if len(self.profile) % PROGRESS_EVERY == 0:
            recent = self.profile.recent()
            elapsed = time.perf_counter() - self.started
            self.bar.set_postfix(fps=f"{len(self.profile) / elapsed:.1f}",
                                 p50=f"{recent['p50']:.0f}ms", p99=f"{recent['p99']:.0f}ms",
                                 dropped=self.pipeline.stats.frames_dropped, refresh=False)

    def close(self) -> None:
        self.bar.close()


def paced(frames: Iterable[Frame], fps: float) -> Iterator[Frame]:
    """The frames re-stamped at `fps` (a file replayed as a live feed of that rate)."""
    for frame in frames:
        yield replace(frame, timestamp_s=frame.index / fps)


@contextlib.contextmanager
def _signals(handler) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM while the block runs (main thread only: elsewhere Python
    delivers no signals, and the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


# what a full disk, a quota, a read-only or unwritable folder raise when a sink writes
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _abort(sinks: Sequence[object], exc: BaseException) -> None:
    """Leave every sink's output `.partial` after `exc`; raise an OutputError instead of `exc`
    when it was a failed write (the caller re-raises anything else)."""
    for sink in sinks:
        if isinstance(sink, Sink):
            sink.abort()
    if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:
        left = [str(s.partial) for s in sinks if isinstance(s, Sink) and s.partial.exists()]
        raise OutputError(f"writing the outputs failed ({exc.strerror}: {exc.filename or '?'});"
                          f" nothing was published, partial files: {left or 'none'}") from exc


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stream(pipeline: Pipeline, source: Source, sinks: Sequence[object], *,
           max_frames: int | None = None, fps: float | None = None, progress: bool = True,
           desc: str = "run") -> tuple[RunProfile, float, bool]:
    """Run `source` (at most `max_frames`, re-stamped at `fps` if given) through `pipeline`.

    The sinks are closed (published) after a clean run, and after Ctrl-C or SIGTERM (how a
    live source ends, or a service manager stops the run); they are aborted on an error. A
    second Ctrl-C or SIGTERM while they publish is held until every sink is published, then
    raised, so the outputs are all published or (on an error) all left as `.partial`. Returns
    the profile, the wall time in seconds and whether a signal stopped the run.
    """
    frames: Iterable[Frame] = source if max_frames is None else islice(source, max_frames)
    if fps is not None:
        frames = paced(frames, fps)
    total = source.frame_count
    if max_frames is not None:
        total = max_frames if total is None else min(total, max_frames)
    profile = RunProfile()
    bar = ProgressSink(pipeline, profile, total, desc, progress)
    started, interrupted = time.perf_counter(), False
    stalled: SourceStalledError | None = None
    try:
        with _signals(_interrupt):
            pipeline.run(frames, [profile, *sinks, bar], collect=False)
    except KeyboardInterrupt:
        interrupted = True
    except SourceStalledError as exc:  # a live feed that stopped: keep what came before it
        stalled = exc
    except BaseException as exc:
        _abort(sinks, exc)
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - started
    held: list[int] = []
    with _signals(lambda signum, frame: held.append(signum)):
        try:  # every file written out first, then all renamed: all published or none
            for sink in sinks:
                if isinstance(sink, Sink):
                    sink.finish()
                else:
                    sink.close()
        except BaseException as exc:
            _abort(sinks, exc)
            raise
        for sink in sinks:
            if isinstance(sink, Sink):
                sink.publish()
    if held:
        raise KeyboardInterrupt(f"{signal.Signals(held[0]).name} while publishing (held until "
                                "every output was published)")
    if stalled is not None:
        stalled.run = (profile, wall)  # what the caller reports before the error
        raise stalled
    return profile, wall, interrupted


# -- what ran, and the summary ------------------------------------------------------------
def environment() -> dict[str, object]:
    """Host and versions, recorded in every summary."""
    versions = {"rau_rt": __version__, "python": platform.python_version(),
                "native": ops.native_info()["built"]}
    for dist in ("numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "opencv-python-headless",
                 "torch"):
        if (version := package_version(dist)) is not None:
            versions[dist] = version
    return {"host": {"cpu": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(),
                     "physical_cores": ops.physical_cores()},
            "versions": versions}


def describe(pipeline: Pipeline) -> dict[str, object]:
    """Per part and graph: the file, backend, precision and device that ran."""
    parts = {}
    for part, bundle in pipeline.bundles.items():
        graphs = {}
        for graph, engine in bundle.engines.items():
            entry = bundle.entry(graph)
            graphs[graph] = {"file": entry.file, "backend": type(engine).__name__,
                             "precision": engine.precision, "device": engine.config.device}
        parts[part] = {"bundle": str(bundle.directory), "graphs": graphs}
    return parts


def summarize(pipeline: Pipeline, profile: RunProfile, wall_s: float, *, command: str,
              source: Source, fps: float | None, warmup: int = 0, interrupted: bool = False,
              extra: dict[str, object] | None = None) -> dict[str, object]:
    """The run's summary record (summary.json)."""
    rate = fps or source.fps
    deadline = 1e3 / rate if rate else None
    latency = profile.summary(deadline, skip_first=warmup)
    return {
        "command": command,
        "source": {"uri": source.uri, "fps": rate, "frames_declared": source.frame_count},
        "regions": list(pipeline.regions),
        "references": ([r.name for r in pipeline.bank.references] if pipeline.bank is not None
                       else None),
        "config": {"localize": bool(pipeline.workers),  # VLM keyframes (bundle or central)
                   "realtime": pipeline.config.realtime,
                   "wait_for_localizer": pipeline.config.wait_for_localizer,
                   "keyframe_every": pipeline.config.keyframes.every,
                   "keyframe_min_score": pipeline.config.keyframes.min_score,
                   "view_similarity": pipeline.config.keyframes.view_similarity,
                   "tracker_profile": pipeline.tracker.config.profile,
                   "tracker_levers": dict(zip(LEVERS, pipeline.tracker.config.levers,
                                              strict=True))},
        "engines": describe(pipeline),
        **environment(),
        "frames_processed": len(profile),
        "interrupted": interrupted,  # stopped by Ctrl-C (a live source's normal end)
        "wall_s": wall_s,
        "throughput_fps": len(profile) / wall_s if wall_s > 0 else None,
        "latency_ms": latency,
        # the VLM's keyframe queries, in its worker (not on the per-frame path)
        "vlm_query_ms": latency_stats([ms for _, ms, _ in pipeline.stats.answers]),
        "pipeline": pipeline.stats.to_dict(),
        # a central localizer's connection per reference: registrations, outages and gaps
        "localizer_service": [w.localizer.health() for w in pipeline.workers
                              if hasattr(w.localizer, "health")] or None,
        **(extra or {}),
    }


def write_report(out: Path, record: dict[str, object], profile: RunProfile, title: str,
                 stem: str = "summary", redactions: dict[str, str] | None = None,
                 ) -> dict[str, Path]:
    """<stem>.json, <stem>.md, latency.png and stages.png in `out` (each written atomically);
    `redactions` (see `redact`) apply to the paths recorded for them too."""
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md",
             "latency_plot": out / "latency.png", "stage_chart": out / "stages.png"}
    latency = record["latency_ms"]
    written = {k: str(p) for k, p in paths.items()}
    record = {**record, "outputs": {**record.get("outputs", {}),
                                    **(redact(written, redactions) if redactions else written)}}
    _atomic_text(paths["json"], json.dumps(record, indent=2) + "\n")
    _atomic_text(paths["markdown"], f"# {title}\n\n{record['command']}\n\n"
                 f"{markdown_table(latency)}\n")
    if len(profile):
        plots.latency_plot(paths["latency_plot"], profile.timestamps_s, profile.latency_ms,
                           deadline_ms=latency["deadline_ms"], title=title)
        plots.stage_chart(paths["stage_chart"], {"end to end": latency["end_to_end"],
                                                 **latency["stages"]}, title=title)
    return paths


def _atomic_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def print_summary(record: dict[str, object], paths: dict[str, Path]) -> None:
    latency = record["latency_ms"]
    stats = record["pipeline"]
    print(markdown_table(latency))
    vlm = record["vlm_query_ms"]
    if vlm["count"]:
        print(f"VLM keyframe queries (in the worker, off the per-frame path): {vlm['count']}, "
              f"p50 {vlm['p50']:.0f} ms, max {vlm['max']:.0f} ms")
    if record["interrupted"]:
        print("stopped by Ctrl-C; the results so far are written")
    print(f"\n{record['frames_processed']} frames in {record['wall_s']:.1f} s "
          f"({record['throughput_fps']:.1f} fps), {len(stats['keyframes'])} keyframes, "
          f"{len(stats['prompts'])} VLM prompts, {len(stats['localizer_errors'])} localizer "
          f"errors, {stats['frames_dropped']} frames dropped; peak RSS "
          f"{latency['peak_rss_mib']:.0f} MiB")
    print(f"summary: {paths['json']} ({paths['latency_plot'].name}, "
          f"{paths['stage_chart'].name})")


# -- rau-rt run -----------------------------------------------------------------------------
def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None,
                        help="engine backend for every graph: onnxruntime, tensorrt, torch or "
                        "auto (default: each graph's first manifest entry)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (never switched)")
    parser.add_argument("--precision", default=None,
                        help="SAM2 graphs' precision (fp32, fp16, int8; default: the bundle's "
                        "first entry); an absent precision is an error, never a fallback")
    parser.add_argument("--vlm-precision", default=None,
                        help="VLM graphs' precision (fp32, int8, int4; default: first entry)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="exact",
                        help="tracking profile: exact (sam2's memory selection) or fast (2 "
                        "attended memories, one stored every second frame, up to 3 frames in "
                        "a row conditioned on a window around each region; README 'Tracking "
                        "profiles'; default %(default)s)")


def add_localize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--localize", choices=("on", "off"), default="on",
                        help="VLM keyframes (default on); off: SAM2 follows the regions from "
                        "the reference's memory alone and the bundle's VLM is not loaded (as "
                        "`rau-rt demo` runs while its VLM is below its accuracy goal)")


def localize(args: argparse.Namespace) -> bool:
    """`--localize`, refused where it contradicts `--localizer URL`."""
    if args.localize == "off" and getattr(args, "localizer", None):
        raise InputError(f"--localize off and --localizer {args.localizer}: a central "
                         "localizer answers keyframes, which --localize off turns off")
    return args.localize == "on"


def tracker_config(args: argparse.Namespace) -> TrackerConfig:
    return TrackerConfig(profile=args.profile)


def engine_configs(args: argparse.Namespace):
    from rau_rt.pipeline.factory import PIPELINE_ENGINE_CONFIG

    sam2 = replace(PIPELINE_ENGINE_CONFIG, device=args.device, precision=args.precision)
    return sam2, replace(sam2, precision=args.vlm_precision)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True,
                        help="pipeline bundle: DIR/sam2 (+ DIR/vlm), see README 'Pipeline'")
    parser.add_argument("--reference", type=Path, required=True, nargs="+",
                        help="reference annotation JSON (rau-rt.reference-annotation); several "
                        "(views of the same anatomy): each frame picks the most similar one "
                        "for the VLM, and a switch is a keyframe")
    parser.add_argument("--source", required=True,
                        help="video file, image folder, DICOM cine, camera:N, rtsp://..., or "
                        "synthetic:seed=0&frames=64")
    parser.add_argument("--regions", default=None,
                        help="comma-separated region names to follow (default: all annotated)")
    parser.add_argument("--out", type=Path, default=Path("rau-rt-out"),
                        help="output folder (default ./rau-rt-out)")
    parser.add_argument("--realtime", action="store_true",
                        help="live mode: frames arrive at their timestamps, the newest wins "
                        "(late ones are dropped and counted), the tracker never waits for the "
                        "VLM; default: offline, every frame, keyframe answers land on the "
                        "next frame")
    parser.add_argument("--view-similarity", type=float, default=None,
                        help="keyframe when the frame's pooled encoder features fall below "
                        "this cosine similarity to the last keyframe's (default off; "
                        "uncalibrated, see README)")
    parser.add_argument("--keyframe-every", type=int, default=KeyframeConfig().every,
                        help="send every K-th frame to the VLM (0: only the first and "
                        "low-score/lost frames)")
    parser.add_argument("--min-score", type=float, default=KeyframeConfig().min_score,
                        help="a region below this score triggers a keyframe")
    parser.add_argument("--localizer-timeout", type=float,
                        default=PipelineConfig().localizer_timeout_s, metavar="SECONDS",
                        help="a VLM query running longer counts as timed out (its keyframe "
                        "fate in the summary); offline runs wait at most this long for an "
                        "answer (default %(default)s)")
    parser.add_argument("--localizer", default=None, metavar="URL",
                        help="a central localizer server (triton://host:port or "
                        "triton+grpc://host:port, see `rau-rt serve-localizer`) answers the "
                        "keyframes instead of the bundle's VLM")
    add_localize_argument(parser)
    parser.add_argument("--max-frames", type=int, default=None, help="stop after N frames")
    parser.add_argument("--fps", type=float, default=None,
                        help="frame rate of an image folder (default: timestamps are frame "
                        "numbers)")
    parser.add_argument("--no-overlay", action="store_true", help="skip overlay.mp4")
    parser.add_argument("--masks", choices=("none", "npz", "png"), default="none",
                        help="also write every mask: masks.npz or masks/<region>/<frame>.png")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="write DICOM SEG (+ Secondary Capture) for VLM keyframes in seg/")
    parser.add_argument("--redact-paths", action="store_true",
                        help="write <source>, <reference N>, <bundle> and <out> in the summary, "
                        "report and plots instead of the paths and file names given (they may "
                        "carry patient names)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_arguments(parser)


def open_sinks(out: Path, overlay: bool, masks: str, dicom_seg: bool,
               source: Source | None = None, realtime: bool = False) -> list[Sink]:
    """The run's sinks in `out`; a DICOM `source` gives the SEGs its patient and study. In
    `realtime`, the DICOM SEG sink (hundreds of ms a keyframe) writes on its own thread."""
    out.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = [JsonlSink(out / "results.jsonl")]
    try:
        if overlay:
            sinks.append(OverlayVideoSink(out / "overlay.mp4"))
        if masks != "none":
            sinks.append(MaskArchiveSink(out / ("masks.npz" if masks == "npz" else "masks")))
        if dicom_seg:
            seg = DicomSegSink(out / "seg", source_dataset=getattr(source, "header", None))
            sinks.append(BackgroundSink(seg) if realtime else seg)
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return sinks


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    keyframes = KeyframeConfig(every=args.keyframe_every, min_score=args.min_score,
                               view_similarity=args.view_similarity)
    return PipelineConfig(keyframes, wait_for_localizer=not args.realtime,
                          localizer_timeout_s=args.localizer_timeout, realtime=args.realtime)


def run(args: argparse.Namespace) -> int:
    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.fps is not None and args.fps <= 0:
        raise InputError(f"--fps must be > 0, got {args.fps}")
    references = [load_reference(path) for path in args.reference]
    regions = [r.strip() for r in args.regions.split(",")] if args.regions else None
    sam2_engine, vlm_engine = engine_configs(args)
    source = open_source(args.source, fps=args.fps)
    with claim_output(args.out), source, open_pipeline(
            args.bundle, references, regions, pipeline_config(args), backend=args.backend,
            engine=sam2_engine, vlm_engine=vlm_engine, tracker=tracker_config(args),
            localizer=args.localizer, localize=localize(args)) as pipeline:
        sinks = open_sinks(args.out, not args.no_overlay, args.masks, args.dicom_seg, source,
                           args.realtime)
        stalled = None
        try:
            profile, wall, interrupted = stream(pipeline, source, sinks,
                                                max_frames=args.max_frames,
                                                progress=not args.quiet)
        except SourceStalledError as exc:  # published; report it, then say it failed
            (profile, wall), interrupted, stalled = exc.run, True, exc
        extra = {"outputs": {type(getattr(s, "inner", s)).__name__: str(s.path)
                             for s in sinks}}
        dropped = {type(s.inner).__name__: s.dropped for s in sinks
                   if isinstance(s, BackgroundSink) and s.dropped}
        if dropped:  # frames a slow background sink had no room for
            extra["sink_frames_dropped"] = dropped
        if stalled is not None:
            extra["ended"] = str(stalled)
        record = summarize(pipeline, profile, wall, command=command_line(args), source=source,
                           fps=source.fps, interrupted=interrupted, extra=extra)
        title, table = f"rau-rt run: {Path(source.uri).name}", None
        if args.redact_paths:
            table = redactions(args)
            record, title = redact(record, table), redact(title, table)
            if record.get("references"):  # the reference names are their file names' stems
                record["references"] = [f"<reference {i + 1}>"
                                        for i in range(len(record["references"]))]
            record["redacted"] = sorted(set(table.values()))
        paths = write_report(args.out, record, profile, title, redactions=table)
    print_summary(record, paths)
    if stalled is not None:
        raise stalled
    return 0


def redactions(args: argparse.Namespace) -> dict[str, str]:
    """Each path the user gave -> a placeholder, and the file or folder name of the source and
    the references (where patient names hide: `Doe_Jane_LAD.dcm`); longest first, so a path is
    replaced whole before its name is."""
    inputs = [(args.source, "<source>"),
              *((path, f"<reference {i + 1}>") for i, path in enumerate(args.reference))]
    table: dict[str, str] = {}
    for value, token in [*inputs, (args.bundle, "<bundle>"), (args.out, "<out>")]:
        table.setdefault(str(Path(str(value)).resolve()), token)
        table.setdefault(str(value), token)
    for value, token in inputs:
        name = Path(str(value)).name
        if len(name) >= 3:
            table.setdefault(name, token)
    return dict(sorted(table.items(), key=lambda item: -len(item[0])))


def redact(value: object, table: dict[str, str]) -> object:
    """`value` (JSON-like) with every occurrence of a `table` key replaced in its string
    values (keys stay: they are the record's own names)."""
    if isinstance(value, str):
        for text, token in table.items():
            value = value.replace(text, token)
        return value
    if isinstance(value, dict):
        return {k: redact(v, table) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, table) for v in value]
    return value


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (`rau_rt.cli.main` keeps argv on the namespace)."""
    argv = getattr(args, "argv", None)
    return "rau-rt " + (shlex.join(argv) if argv is not None else args.command)
