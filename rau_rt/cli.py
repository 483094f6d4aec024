"""The `rau-rt` command. Each subcommand is a (configure, run) pair in `COMMANDS`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module

from rau_rt._version import __version__
from rau_rt.errors import RauRtError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _configure_doctor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_doctor(args: argparse.Namespace) -> int:
    from rau_rt import doctor

    rows = doctor.collect()
    if args.json:
        print(json.dumps(doctor.to_json(rows), indent=2))
    else:
        print(doctor.to_table(rows))
    return 0


def _configure_export(parser: argparse.ArgumentParser) -> None:
    from rau_rt.export import command

    command.configure(parser)


def _run_export(args: argparse.Namespace) -> int:
    from rau_rt.export import command
    from rau_rt.synthetic import generate_sequence

    # export sits below synthetic (ARCHITECTURE.md rule 3): the CLI hands it the generator of
    # the angiography frames `export sam2` verifies and calibrates on.
    return command.run(args, generate_sequence)


def _configure(module: str, name: str = "configure",
               ) -> Callable[[argparse.ArgumentParser], None]:
    def configure(parser: argparse.ArgumentParser) -> None:
        getattr(import_module(f"rau_rt.commands.{module}"), name)(parser)

    return configure


def _run(module: str, name: str = "run") -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return getattr(import_module(f"rau_rt.commands.{module}"), name)(args)

    return run


COMMANDS: tuple[Command, ...] = (
    Command("doctor", "report what this host can run (versions, providers, GPU, native ops)",
            _configure_doctor, _run_doctor),
    Command("synth", "write a synthetic coronary angiography cine with exact ground truth",
            _configure("synth"), _run("synth")),
    Command("export", "export stages: SAM2 and VLM bundles (sam2, vlm), TensorRT engines for a "
            "bundle (trt), ONNX graphs checked for TensorRT (lint)", _configure_export,
            _run_export),
    Command("train", "train the demo models on synthetic angiography (sam2), resumable, "
            "with a training record", _configure("train"), _run("train")),
    Command("run", "track reference regions through a video, DICOM cine, folder, camera or "
            "stream with a pipeline bundle; writes results, overlay and a latency summary",
            _configure("run"), _run("run")),
    Command("demo", "the whole job on built-in defaults: synthetic cine + reference, a "
            "bundle of the demo models (cached), SAM2 tracking (+ VLM keyframes when fit), "
            "outputs, latency and accuracy against the cine's truth",
            _configure("demo"), _run("demo")),
    Command("bench", "latency of a pipeline bundle on this box: per stage and end to end, "
            "jitter, tail, deadline misses, peak memory (JSON, Markdown, PNG)",
            _configure("bench"), _run("bench")),
    Command("serve-localizer", "serve a bundle's VLM localizer to many towers through Triton "
            "Inference Server (PyTriton; HTTP/gRPC, KServe v2)",
            _configure("serve", "configure_serve"), _run("serve", "run_serve")),
    Command("triton-repo", "write a Triton model repository (Python backend) serving a "
            "bundle's VLM localizer, for a production tritonserver",
            _configure("serve", "configure_repo"), _run("serve", "run_repo")),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rau-rt", description="Edge inference runtime for reference-based anatomy tracking.")
    parser.add_argument("--version", action="version", version=f"rau-rt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rau-rt` console script; returns the process exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # summaries record the command as typed
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except RauRtError as exc:
        print(f"rau-rt {args.command}: error: {exc}", file=sys.stderr)
        return 1
