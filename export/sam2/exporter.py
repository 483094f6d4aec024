"""Export SAM2's whole video path as a verified bundle of four graphs (issue 6).

    rau-rt export sam2 (--checkpoint PATH --config NAME | --random-init NAME) --image-size N
        --precision fp32|fp16|int8 [--int8-method dynamic|qdq] [--backend onnx|aoti] --out BUNDLE

Stages: build or load the model from sam2's classes (`model`) -> wrap its four graphs
(`graphs`, where the input/output contract is written down) -> drive them eagerly over
synthetic angiography frames for verification and calibration inputs (`inputs`) -> per graph:
ONNX (and AOTInductor) through `rau_rt.export.graph.export_graph`, which reloads the file
through `rau_rt.engines` and fails outside the fp32 tolerance -> mask IoU on the decoder's
logits -> int8 (`rau_rt.export.quantize`) or fp16 (`rau_rt.export.trt_build.convert_fp16`:
LayerNorm and Softmax kept fp32, the TensorRT fp16 failure mode of Hiera/ViT encoders),
verified the same way; a graph whose drift exceeds `verify.SAM2_TOLERANCES` stays fp32 and the
manifest says why -> `manifest.json` and `sam2.json` (`rau_rt.sam2_layout`: token-selection
settings, mask_downsample weights).

Memory attention is exported three times: as sam2 computes it, as `memory_attention_pooled`
(each memory's keys and values averaged over 2 x 2 blocks after RoPE: the tracker's
`memory_pool` lever) and as `memory_attention_window` (only a square of a quarter of the frame's
tokens around each region: the `memory_window` lever), each verified against its own eager
module. All take sam2's own compacted layout: 1..MAX_SLOTS spatial memories and 1..MAX_POINTERS
object pointers as dynamic dimensions (no padding, no masks), so the first computes exactly what
sam2 attends to; TensorRT builds one profile over those ranges with the steady state (7
memories, 16 pointers) as its optimum, and the tracker's MemoryBank hands it views of fixed
arrays (RSS constant over a stream). Regions are the batch dimension, dynamic 1..16 (each
region's memory differs; the frame's features enter once with batch 1).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rau_rt.bundle import (
    GraphEntry,
    Manifest,
    file_sha256,
    side_files,
    tool_versions,
    write_manifest,
)
from rau_rt.engines import registry
from rau_rt.errors import InputError
from rau_rt.export import fused_attention, trt_build
from rau_rt.export import quantize as int8
from rau_rt.export.graph import DynamicDim, export_graph
from rau_rt.export.sam2 import graphs
from rau_rt.export.sam2.inputs import CheckFrames, build_inputs, to_numpy
from rau_rt.export.sam2.model import (
    RANDOM_PRESENCE_BIAS,
    ModelSource,
    load_model,
    stored_memory_pool,
)
from rau_rt.export.verify import (
    SAM2_MASK_TOLERANCES,
    SAM2_TOLERANCES,
    ParityError,
    compare,
    mask_agreement,
)
from rau_rt.sam2_layout import (
    LAYOUT_FILE,
    MAX_POINTERS,
    MAX_REGIONS,
    MAX_SLOTS,
    POOLED_MEMORY_ATTENTION,
    RECENT_POINTERS,
    RECENT_SLOTS,
    WINDOWED_MEMORY_ATTENTION,
    write_layout,
)

log = logging.getLogger(__name__)

BACKENDS = {"onnx": "onnxruntime", "aoti": "aotinductor"}
PRECISIONS = ("fp32", "fp16", "int8")
REGIONS = DynamicDim("regions", 1, MAX_REGIONS)
POINTS = DynamicDim("points", 1, graphs.MAX_POINTS)
# steady state with one conditioning frame: 1 + 6 memories, 1 + 15 pointers (TensorRT's opt)
MEMORY_SLOTS = DynamicDim("memory_slots", 1, MAX_SLOTS, opt=RECENT_SLOTS + 1)
POINTER_SLOTS = DynamicDim("pointer_slots", 1, MAX_POINTERS,
                           opt=RECENT_POINTERS + 1)
# input -> {axis: dim}; every other axis is fixed by the image size and the model.
DYNAMIC = {
    "image_encoder": {},
    "mask_decoder": {"image_embed": {0: REGIONS}, "point_coords": {0: REGIONS, 1: POINTS},
                     "point_labels": {0: REGIONS, 1: POINTS}, "mask_input": {0: REGIONS},
                     "has_mask_input": {0: REGIONS}},
    "memory_attention": {"memory": {0: REGIONS, 1: MEMORY_SLOTS},
                         "memory_pos": {0: REGIONS, 1: MEMORY_SLOTS},
                         "memory_tpos_index": {0: REGIONS, 1: MEMORY_SLOTS},
                         "object_pointers": {0: REGIONS, 1: POINTER_SLOTS},
                         "pointer_position": {0: REGIONS, 1: POINTER_SLOTS}},
    "memory_encoder": {"masks": {0: REGIONS}, "object_score": {0: REGIONS},
                       "binarize": {0: REGIONS}},
}
DYNAMIC[POOLED_MEMORY_ATTENTION] = DYNAMIC["memory_attention"]
DYNAMIC[WINDOWED_MEMORY_ATTENTION] = {**DYNAMIC["memory_attention"],
                                      "window_index": {0: REGIONS}}
MASK_OUTPUTS = {"mask_decoder": "masks"}
# Graphs whose attention dominates: exported a second time with ONNX Runtime's fused attention
# (export/fused_attention.py), listed first for ONNX Runtime; the standard graph stays the
# TensorRT source.
FUSED_ATTENTION_GRAPHS = ("image_encoder", "memory_attention", POOLED_MEMORY_ATTENTION,
                          WINDOWED_MEMORY_ATTENTION)


@dataclass(frozen=True)
class Sam2ExportConfig:
    """One `rau-rt export sam2` run; CLI flags map one-to-one onto fields."""

    source: ModelSource
    out: Path
    precision: str = "fp32"  # fp32 | fp16 | int8 (fp16/int8 keep the fp32 graphs beside them)
    backends: tuple[str, ...] = ("onnx",)  # onnx always; "aoti" adds AOTInductor packages
    int8_method: str = "dynamic"  # dynamic (CPU) | qdq (calibrated, TensorRT's int8 format)
    # False keeps every lowered graph whatever its drift (to measure what int8 costs in task
    # accuracy); the manifest records the failed parity and that the gate was off
    precision_gate: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision {self.precision!r}: expected one of {PRECISIONS}")
        unknown = set(self.backends) - set(BACKENDS)
        if unknown or "onnx" not in self.backends:
            raise InputError(f"backends {self.backends}: expected 'onnx' plus optionally "
                             f"'aoti' (known: {sorted(BACKENDS)})")
        if self.int8_method not in int8.METHODS:
            raise InputError(f"int8_method {self.int8_method!r}: expected one of {int8.METHODS}")

    @property
    def command(self) -> str:
        """The CLI command that reproduces this export."""
        s = self.source
        model = (f"--random-init {s.random_init}" if s.random_init else
                 f"--checkpoint {s.checkpoint} --config {s.config}")
        backend = " --backend aoti" if "aoti" in self.backends else ""
        method = f" --int8-method {self.int8_method}" if self.precision == "int8" else ""
        gate = "" if self.precision_gate else " --no-precision-gate"
        return (f"rau-rt export sam2 {model} --image-size {s.image_size} --precision "
                f"{self.precision}{method}{gate}{backend} --out {self.out}")


@dataclass(frozen=True)
class GraphSummary:
    """One row of the summary table."""

    graph: str
    file: str
    precision: str
    size_mb: float
    max_abs: float
    cosine: float
    iou: float | None
    lint: str
    note: str = ""


def _check_masks(graph: str, entry: GraphEntry, directory: Path,
                 reference: dict[str, np.ndarray], feeds: dict[str, np.ndarray],
                 precision: str) -> dict[str, object] | None:
    """Mask agreement of the written graph's mask logits, or None for graphs without masks."""
    if graph not in MASK_OUTPUTS:
        return None
    name = MASK_OUTPUTS[graph]
    with registry.open_engine(directory / entry.file, entry.backend,
                              precision=entry.precision) as engine:
        got = engine.run(feeds)[name]
    return mask_agreement(reference[name], got, SAM2_MASK_TOLERANCES[precision])


def _with_record(entry: GraphEntry, masks: dict[str, object] | None, notes: dict[str, str],
                 **parity_extra: object) -> GraphEntry:
    parity = dict(entry.parity or {})
    if masks is not None:
        parity["masks"] = masks
    parity.update(parity_extra)
    return replace(entry, parity=parity, exporter={**entry.exporter, **notes})


def _label(config: Sam2ExportConfig) -> str:
    return f"int8 ({config.int8_method})" if config.precision == "int8" else config.precision


def _lower_graph(graph: str, fp32: GraphEntry, directory: Path, config: Sam2ExportConfig,
                 reference: dict[str, np.ndarray], feeds: dict[str, np.ndarray],
                 calibration: list[dict[str, np.ndarray]],
                 notes: dict[str, str]) -> tuple[GraphEntry | None, dict[str, object]]:
    """(int8/fp16 entry or None, its parity record): None when the drift is over tolerance."""
    precision = config.precision
    path = directory / f"{graph}.{precision}.onnx"
    if precision == "int8":
        try:
            int8.quantize(directory / fp32.file, path, config.int8_method, calibration)
        except int8.NothingToQuantizeError as exc:
            return None, {"precision": "int8", "passed": False, "reason": str(exc),
                          "method": _label(config)}
        made_by = {"name": "rau_rt.export.quantize.quantize", "int8_method": config.int8_method}
    else:
        trt_build.convert_fp16(directory / fp32.file, path)
        made_by = {"name": "rau_rt.export.trt_build.convert_fp16",
                   "kept_fp32": ",".join(trt_build.FP32_SENSITIVE_OPS)}
    with registry.open_engine(path, "onnxruntime", precision=precision) as engine:
        outputs = engine.run(feeds)
        inputs, outs = engine.inputs, engine.outputs
    parity = compare(reference, outputs, precision, SAM2_TOLERANCES[precision])
    if graph in MASK_OUTPUTS:
        name = MASK_OUTPUTS[graph]
        parity["masks"] = mask_agreement(reference[name], outputs[name],
                                         SAM2_MASK_TOLERANCES[precision])
        parity["passed"] = parity["passed"] and parity["masks"]["passed"]
    parity["method"] = _label(config)
    parity["reference"] = f"torch {torch.__version__} eager fp32 on cpu"
    if not parity["passed"] and config.precision_gate:
        path.unlink()
        return None, parity
    if not parity["passed"]:
        notes = {**notes, "precision_gate": f"off: kept although {_drift(parity)}"}
    entry = GraphEntry(
        graph=graph, file=path.name, backend="onnxruntime", precision=precision, inputs=inputs,
        outputs=outs, sha256=file_sha256(path), device="any",
        source_checkpoint_sha256=fp32.source_checkpoint_sha256,
        exporter={**fp32.exporter, **notes, **made_by},
        tools=tool_versions(), parity=parity, dynamic_ranges=fp32.dynamic_ranges,
        lint=trt_build.lint(path).to_dict())
    return entry, parity


def _drift(parity: dict[str, object]) -> str:
    """What put a lowered graph over the tolerance, e.g. "masks IoU 0.9250 (>= 0.98)"."""
    if "reason" in parity:  # not lowered at all (nothing to quantize)
        return str(parity["reason"])
    precision = parity["precision"]
    tolerance, masks = SAM2_TOLERANCES[precision], parity.get("masks")
    parts = [f"{name} cosine {o['cosine']:.5f} < {tolerance.min_cosine}"
             for name, o in parity["outputs"].items() if not o["passed"]]
    if masks is not None and not masks["passed"]:
        iou = "n/a" if masks["iou"] is None else f"{masks['iou']:.4f}"
        parts.append(f"masks IoU {iou} (>= {SAM2_MASK_TOLERANCES[precision].min_iou}), "
                     f"sign flips {masks['sign_flip_fraction']:.4f} "
                     f"(<= {SAM2_MASK_TOLERANCES[precision].max_sign_flip})")
    return "; ".join(parts)


def _summary(entry: GraphEntry, directory: Path, note: str = "") -> GraphSummary:
    outputs = (entry.parity or {}).get("outputs", {})
    masks = (entry.parity or {}).get("masks") or {}
    lint = entry.lint
    return GraphSummary(
        graph=entry.graph, file=entry.file, precision=entry.precision,
        size_mb=(directory / entry.file).stat().st_size / 1e6,
        max_abs=max((o["max_abs"] for o in outputs.values()), default=0.0),
        cosine=min((o["cosine"] for o in outputs.values()), default=1.0),
        iou=masks.get("iou"), note=note,
        lint="-" if lint is None else ("ok" if lint["tensorrt_ready"] else
                                       "ORT only (fused)" if entry.exporter.get("variant")
                                       else f"{lint['errors']} errors"))


def export_sam2(config: Sam2ExportConfig, check: CheckFrames,
                progress: Callable[[str], None] | None = None,
                ) -> tuple[Manifest, list[GraphSummary]]:
    """Build the model, export and verify its four graphs, write the bundle's manifest.

    Args:
        config: What to export and how.
        check: Frames and box prompts the graphs are verified (and int8-calibrated) on, e.g.
            `CheckFrames.synthetic(rau_rt.synthetic.generate_sequence)`.
        progress: Called with each stage's name as it starts.

    Raises:
        CheckpointError: the checkpoint does not fit its config.
        ParityError: an fp32 graph disagrees with eager sam2 beyond verify.SAM2_TOLERANCES.
    """
    step = progress or (lambda stage: None)
    if not 2 <= len(check.boxes) <= MAX_REGIONS:
        # torch.export specializes a dynamic dimension whose example size is 1
        raise InputError(f"{len(check.boxes)} check regions: expected 2..{MAX_REGIONS} (the "
                         "region axis is dynamic; an example of 1 would fix it to 1)")
    source = config.source
    directory = Path(config.out)
    directory.mkdir(parents=True, exist_ok=True)
    step("load model")
    model = load_model(source)
    modules = graphs.graph_modules(model)
    checkpoint_sha = file_sha256(source.checkpoint) if source.checkpoint else None
    model_note = (f"{source.random_init} random-init seed {source.seed}, presence-head bias "
                  f"+{RANDOM_PRESENCE_BIAS} so regions are present" if source.random_init
                  else f"checkpoint {source.checkpoint} ({source.config})")
    step("verification inputs")
    inputs = build_inputs(model, modules, check)
    entries: list[GraphEntry] = []
    rows: list[GraphSummary] = []
    for graph in graphs.GRAPH_NAMES:
        module, example = modules[graph], inputs.example[graph]
        notes = {"command": config.command, "model": model_note,
                 "contract": graphs.CONTRACT[graph], "image_size": str(source.image_size)}
        feeds = to_numpy(example)
        with torch.no_grad():
            result = module(*example.values())
        result = result if isinstance(result, tuple) else (result,)
        reference = {name: t.float().numpy() for name, t in zip(graphs.OUTPUTS[graph], result,
                                                                strict=True)}
        graph_entries: list[GraphEntry] = []
        for backend in config.backends:
            step(f"{graph}: {backend}")
            started = time.perf_counter()
            with warnings.catch_warnings():
                # The ONNX exporter warns once per input that shares a dim ("regions") with
                # another: the axis keeps its name, which is what we ask for.
                warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be "
                                        "used, since it shares the same shape constraints")
                entry = export_graph(module, example, directory, graph, BACKENDS[backend],
                                     output_names=graphs.OUTPUTS[graph], dynamic=DYNAMIC[graph],
                                     source_checkpoint_sha256=checkpoint_sha)
            masks = _check_masks(graph, entry, directory, reference, feeds, "fp32")
            entry = _with_record(entry, masks, notes,
                                 export_s=round(time.perf_counter() - started, 2))
            if masks is not None and not masks["passed"]:
                raise ParityError(f"{directory / entry.file}: masks disagree with eager sam2 "
                                  f"beyond {SAM2_MASK_TOLERANCES['fp32']}: {masks}")
            graph_entries.append(entry)
            if backend == "onnx" and graph in FUSED_ATTENTION_GRAPHS:
                step(f"{graph}: onnx, fused attention")
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not "
                                            "be used, since it shares the same shape")
                    fused = export_graph(module, example, directory, graph, "onnxruntime",
                                         output_names=graphs.OUTPUTS[graph],
                                         dynamic=DYNAMIC[graph],
                                         source_checkpoint_sha256=checkpoint_sha,
                                         variant=fused_attention.VARIANT)
                graph_entries.insert(0, _with_record(
                    fused, None, notes, export_s=round(time.perf_counter() - started, 2)))
        # int8 for ONNX Runtime (dynamic) comes from the fused graph; TensorRT's formats (QDQ,
        # fp16) from the standard one
        onnx_fp32 = next(e for e in graph_entries if e.backend == "onnxruntime" and (
            (config.precision == "int8" and config.int8_method == "dynamic")
            or e.exporter.get("variant") is None))
        if config.precision != "fp32":
            step(f"{graph}: {_label(config)}")
            calibration = [to_numpy(f) for f in inputs.calibration[graph]]
            quantized, parity = _lower_graph(graph, onnx_fp32, directory, config, reference,
                                             feeds, calibration, notes)
            lowered_from = graph_entries.index(onnx_fp32)
            if quantized is None:
                # no silent downgrade: the manifest and the summary say the graph stays fp32
                reason = f"{_label(config)} rejected: {_drift(parity)}"
                graph_entries[lowered_from] = _with_record(
                    onnx_fp32, None, {"precision_choice": f"fp32: {reason}"},
                    **{f"{config.precision}_rejected": parity})
                log.warning("%s stays fp32: %s", graph, reason)
            else:
                graph_entries[lowered_from] = _with_record(onnx_fp32, None, {
                    "precision_choice": f"{config.precision} first; fp32 kept (TensorRT "
                    "source, reference)"})
                graph_entries.insert(0, quantized)
        entries.extend(graph_entries)
        rows.extend(_summary(e, directory, e.exporter.get("precision_choice", "")
                             if e.precision == "fp32" and config.precision != "fp32" else "")
                    for e in graph_entries)
    name = f"sam2-{source.name}-{source.image_size}"
    write_layout(directory, replace(graphs.layout(model),
                                    memory_pool=stored_memory_pool(source.checkpoint)))
    manifest = Manifest(name=name, graphs=tuple(entries),
                        files=side_files(directory, [LAYOUT_FILE]))
    write_manifest(directory, manifest)
    return manifest, rows


def format_summary(rows: list[GraphSummary]) -> str:
    """The summary table the CLI prints."""
    lines = [f"{'graph':<17} {'file':<33} {'precision':<9} {'MB':>7} {'max err':>9} "
             f"{'cosine':>9} {'IoU':>7}  lint"]
    for r in rows:
        iou = "-" if r.iou is None else f"{r.iou:.4f}"
        lines.append(f"{r.graph:<17} {r.file:<33} {r.precision:<9} {r.size_mb:>7.1f} "
                     f"{r.max_abs:>9.2e} {r.cosine:>9.6f} {iou:>7}  {r.lint}"
                     + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def run_cli(args, generate_sequence: Callable[..., object]) -> int:
    """`rau-rt export sam2`: export with a progress bar per stage, then print the summary.

    `generate_sequence` is `rau_rt.synthetic.generate_sequence`, passed in by `rau_rt.cli`.
    """
    from tqdm import tqdm

    source = ModelSource(image_size=args.image_size, checkpoint=args.checkpoint,
                         config=args.config, random_init=args.random_init)
    config = Sam2ExportConfig(source=source, out=args.out, precision=args.precision,
                              backends=("onnx",) if args.backend == "onnx" else ("onnx", "aoti"),
                              int8_method=args.int8_method,
                              precision_gate=not args.no_precision_gate)
    stages = 2 + len(FUSED_ATTENTION_GRAPHS) + len(graphs.GRAPH_NAMES) * (
        len(config.backends) + (config.precision != "fp32"))
    started = time.perf_counter()
    with tqdm(total=stages, desc="export sam2", unit="stage") as bar:
        def step(stage: str) -> None:
            if bar.n or stage != "load model":
                bar.update(1)
            bar.set_postfix_str(stage)
        _, rows = export_sam2(config, CheckFrames.synthetic(generate_sequence), step)
        bar.update(1)
    print(format_summary(rows))
    print(f"bundle {config.out} written in {time.perf_counter() - started:.1f} s")
    return 0
