"""SAM2's four graphs on CPU: torch eager vs ONNX Runtime fp32 vs ONNX Runtime int8 (vs AOTI).

    python -m benchmarks.bench_sam2_graphs [--quick] [--run CONFIG@SIZE] [--aoti] [--json PATH]

Full: SAM2.1-tiny (random weights) at 1024 and 512 px; quick: the micro model at 256 and 512;
`--run tiny@512` one of the mode's sizes.
Each size is exported with `rau_rt.export.sam2.export_sam2` (fp32 + dynamic int8, verified; the
export time is recorded), then every graph runs on the feeds it was verified on (2 regions;
memory attention over 2 memories and 2 pointers, frame 2 of the check clip) through
`Engine.run`, NumPy in and out; every manifest entry of a graph is timed (the fused-attention
variant, the standard graph, int8). Backends take interleaved turns (benchmarks.harness);
ratios are against eager from the same run. A graph whose int8 drift was over tolerance has
no int8 case (the export kept fp32).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import case_record, run_suite, time_interleaved
from rau_rt.config import EngineConfig
from rau_rt.engines import registry
from rau_rt.export.sam2 import Sam2ExportConfig, export_sam2
from rau_rt.export.sam2 import graphs as sam2_graphs
from rau_rt.export.sam2.inputs import CheckFrames, build_inputs, to_numpy
from rau_rt.export.sam2.model import ModelSource, load_model
from rau_rt.export.verify import SAM2_MASK_TOLERANCES, compare, mask_agreement
from rau_rt.synthetic import generate_sequence

SUITE = "sam2_graphs"
BASELINE = "torch-eager"


@dataclass(frozen=True)
class Run:
    """One model at one image size, with its loop sizes."""

    model: str
    image_size: int
    repeat_slow: int  # image encoder, memory attention (seconds per call at tiny 1024)
    repeat_fast: int  # mask decoder, memory encoder


RUNS = {
    "full": (Run("tiny", 1024, 5, 20), Run("tiny", 512, 10, 30)),
    "quick": (Run("micro", 256, 5, 10), Run("micro", 512, 5, 10)),
}
SLOW = ("image_encoder", "memory_attention")  # and its pooled and windowed variants


def _fidelity(graph: str, reference: dict, outputs: dict, precision: str) -> dict[str, object]:
    parity = compare(reference, outputs, "fp32")
    fidelity: dict[str, object] = {
        "max_abs": max(o["max_abs"] for o in parity["outputs"].values()),
        "cosine": min(o["cosine"] for o in parity["outputs"].values())}
    if graph == "mask_decoder":
        masks = mask_agreement(reference["masks"], outputs["masks"],
                               SAM2_MASK_TOLERANCES[precision])
        fidelity.update(mask_iou=masks["iou"], sign_flips=masks["sign_flip_fraction"])
    return fidelity


def bench(run: Run, workdir: Path, aoti: bool) -> tuple[list[dict[str, object]], dict]:
    """Export one size, then time every graph on every backend; (cases, export facts)."""
    source = ModelSource(image_size=run.image_size, random_init=run.model)
    out = workdir / f"{run.model}_{run.image_size}"
    check = CheckFrames.synthetic(generate_sequence, regions=2)
    started = time.perf_counter()
    manifest, _ = export_sam2(Sam2ExportConfig(source, out, precision="int8",
                                               backends=("onnx", "aoti") if aoti else ("onnx",)),
                              check)
    export_s = time.perf_counter() - started
    model = load_model(source)
    modules = sam2_graphs.graph_modules(model)
    inputs = build_inputs(model, modules, check)
    cases = []
    for graph in sam2_graphs.GRAPH_NAMES:
        entries = manifest.entries(graph)
        fp32 = next(e for e in entries if e.backend == "onnxruntime" and e.precision == "fp32")
        engines = {BASELINE: registry.backend_class("torch").from_module(
            modules[graph], fp32.inputs, fp32.outputs)}
        labels = {BASELINE: (BASELINE, "fp32")}
        for entry in entries:
            backend = entry.backend + ("-fused" if entry.exporter.get("variant") else "")
            key = f"{backend} {entry.precision}"
            labels[key] = (backend, entry.precision)
            engines[key] = registry.open_engine(out / entry.file, entry.backend,
                                                EngineConfig(), precision=entry.precision)
        feeds = to_numpy(inputs.example[graph])
        results = {name: engine.run(feeds) for name, engine in engines.items()}
        slow = graph.startswith(SLOW)
        samples = time_interleaved(
            {name: (lambda e=engine, f=feeds: e.run(f)) for name, engine in engines.items()},
            warmup=1, repeat=run.repeat_slow if slow else run.repeat_fast, turn=1,
            settle=0 if slow else 1)
        for engine in engines.values():
            engine.close()
        case = f"{graph}_{run.model}_{run.image_size}px"
        for name, (backend, precision) in labels.items():
            cases.append(case_record(case, backend, precision, samples[name], BASELINE,
                                     samples[BASELINE],
                                     _fidelity(graph, results[BASELINE], results[name],
                                               precision if precision == "int8" else "fp32")))
    facts = {"model": run.model, "image_size": run.image_size, "export_s": round(export_s, 1),
             "graphs": {e.file: e.precision for e in manifest.graphs}}
    return cases, facts


def main(argv: list[str] | None = None) -> int:
    def collect(args, workdir: Path) -> tuple[list, dict]:
        cases, exports = [], []
        runs = [r for r in RUNS["quick" if args.quick else "full"]
                if args.run in (None, f"{r.model}@{r.image_size}")]
        if not runs:
            raise SystemExit(f"--run {args.run}: not a size of this mode")
        for run in runs:
            if args.repeat:
                run = dataclasses.replace(run, repeat_slow=args.repeat, repeat_fast=args.repeat)
            run_cases, facts = bench(run, workdir, args.aoti)
            cases += run_cases
            exports.append(facts)
        return cases, {"exports": exports}

    def aoti_flag(parser) -> None:
        parser.add_argument("--aoti", action="store_true",
                            help="also time the AOTInductor packages (minutes of compiling)")
        parser.add_argument("--run", default=None, metavar="CONFIG@SIZE",
                            help="only this size of the mode's (e.g. tiny@512)")

    return run_suite("bench_sam2_graphs", __doc__, "benchmarks/results/sam2_graphs_cpu.json",
                     collect, argv=argv, suite=SUITE, extra_args=aoti_flag,
                     device_extra=lambda: {"torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    sys.exit(main())
