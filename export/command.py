"""`rau-rt export ...`: the export stages as subcommands (registered in `rau_rt.cli`).

`export sam2` turns a SAM2 checkpoint into a verified bundle of four graphs; `export vlm`
exports and quantizes a Qwen-VL fine-tune; `export trt` builds a TensorRT engine for every graph
of a bundle on this host and adds the engines to the manifest; `export lint` checks ONNX graphs
against TensorRT 10's parser. Heavy
imports (onnx, tensorrt) happen inside the run functions.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from rau_rt.bundle import (
    GraphEntry,
    Manifest,
    file_sha256,
    read_manifest,
    tool_versions,
    write_manifest,
)
from rau_rt.config import EngineConfig
from rau_rt.errors import BundleError, InputError

log = logging.getLogger(__name__)
GIB = 1 << 30


def _source_entry(manifest: Manifest, graph: str, precision: str) -> GraphEntry:
    """The ONNX entry an engine of `precision` is built from (QDQ for int8; fp16 or fp32)."""
    # ONNX Runtime-only variants (fused attention) are not TensorRT-parsable
    onnx_entries = [e for e in manifest.entries(graph) if e.backend == "onnxruntime"
                    and e.exporter.get("variant") is None]
    wanted = {"int8": ("int8",), "fp16": ("fp16", "fp32"), "fp32": ("fp32",)}[precision]
    for want in wanted:
        for entry in onnx_entries:
            if entry.precision == want:
                return entry
    raise BundleError(f"graph {graph!r} has no ONNX entry in {wanted} to build a {precision} "
                      "engine from (int8 needs the quantized QDQ graph; a VLM bundle lowered "
                      "to int8/int4 keeps its fp32 graphs only when exported with "
                      "--keep-reference)")


def build_bundle(directory: str | Path, precision: str = "fp16", workspace_gb: float = 4.0,
                 timing_cache: str | Path | None = None,
                 keep_fp32: tuple[str, ...] | None = None) -> list[GraphEntry]:
    """Build one TensorRT engine per graph of the bundle and record them in its manifest.

    Engines are built on the host that will run them (they are tied to the TensorRT version and
    the GPU); each entry records both, the command that rebuilt it, and its parity against the
    ONNX graph it came from, run by onnxruntime on the same random feeds.
    """
    from rau_rt.engines import registry
    from rau_rt.engines.tensorrt import host_info
    from rau_rt.export import trt_build
    from rau_rt.export.verify import compare, require_parity

    directory = Path(directory)
    manifest = read_manifest(directory)
    keep = trt_build.FP32_SENSITIVE_OPS if keep_fp32 is None else keep_fp32
    host = host_info()
    command = (f"rau-rt export trt --bundle {directory} --precision {precision} "
               f"--workspace-gb {workspace_gb:g}"
               + (f" --timing-cache {timing_cache}" if timing_cache else ""))
    built: list[GraphEntry] = []
    for graph in manifest.graph_names:
        source = _source_entry(manifest, graph, precision)
        out = directory / f"{graph}.{precision}.engine"
        profiles = {name: (r["min"], r["opt"], r["max"])
                    for name, r in source.dynamic_ranges.items()}
        trt_build.build(directory / source.file, out, precision, profiles,
                         int(workspace_gb * GIB), timing_cache, keep)
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in source.inputs:
            shape = source.dynamic_ranges.get(spec.name, {}).get("opt") or spec.shape
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        with registry.open_engine(directory / source.file, "onnxruntime") as reference, \
                registry.open_engine(out, "tensorrt", EngineConfig(device="cuda"),
                                     precision=precision) as engine:
            parity = compare(reference.run(feeds), engine.run(feeds), precision)
            inputs, outputs = engine.inputs, engine.outputs
        require_parity(parity, str(out))
        parity["reference"] = f"onnxruntime {source.file} ({source.precision})"
        built.append(GraphEntry(
            graph=graph, file=out.name, backend="tensorrt", precision=precision,
            inputs=inputs, outputs=outputs, sha256=file_sha256(out), device="cuda",
            source_checkpoint_sha256=source.source_checkpoint_sha256,
            exporter={"name": "rau_rt.export.trt_build.build", "command": command},
            tools=tool_versions(tensorrt=host["tensorrt"],
                                compute_capability=host["compute_capability"], gpu=host["gpu"]),
            parity=parity, dynamic_ranges=source.dynamic_ranges))
    names = {e.file for e in built}
    kept = tuple(e for e in manifest.graphs if e.file not in names)
    write_manifest(directory, replace(manifest, graphs=kept + tuple(built)))
    return built


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rau-rt export` and its stages."""
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    trt = stages.add_parser("trt", help="build TensorRT engines for every graph of a bundle, "
                            "on this host (engines are tied to the TensorRT version and GPU)")
    trt.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    trt.add_argument("--precision", choices=("fp16", "int8", "fp32"), default="fp16",
                     help="fp16 (fp32 graph converted, LayerNorm/Softmax kept fp32) or int8 "
                     "(from the bundle's QDQ graph); default fp16")
    trt.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace (GiB)")
    trt.add_argument("--timing-cache", type=Path, default=None,
                     help="timing cache file, read and updated (speeds up rebuilds)")
    trt.add_argument("--keep-fp32", default=None,
                     help="comma-separated op types kept fp32 in fp16 engines (default: "
                     "LayerNormalization,Softmax; '' for none)")
    sam2 = stages.add_parser("sam2", help="export SAM2's video path (image encoder, mask "
                             "decoder, memory attention, memory encoder) as a verified bundle")
    model = sam2.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=Path, help="Meta's sam2.1_hiera_*.pt "
                       "({'model': state_dict}); needs --config")
    model.add_argument("--random-init", choices=("micro", "mini", "tiny", "small"),
                       help="random weights: micro (tests), mini, or the tiny/small configs")
    sam2.add_argument("--config", help="the checkpoint's config: tiny, small, base_plus, large, "
                      "micro, mini or a sam2 config path")
    sam2.add_argument("--image-size", type=int, choices=(1024, 512, 256), default=1024,
                      help="input side: 1024 (sam2), 512 (MedSAM2, ARCADE); 256 micro and mini "
                      "only")
    sam2.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                      help="int8: quantize per graph; fp16: for GPUs, LayerNorm/Softmax kept "
                      "fp32; a graph whose drift is over tolerance stays fp32 (recorded)")
    sam2.add_argument("--no-precision-gate", action="store_true",
                      help="keep every int8/fp16 graph even where its drift is over tolerance "
                      "(to measure its accuracy cost; the manifest records it)")
    sam2.add_argument("--int8-method", choices=("dynamic", "qdq"), default="dynamic",
                      help="dynamic (ONNX Runtime CPU) or qdq (MatMul/Conv, calibrated on "
                      "synthetic frames; TensorRT's int8 input)")
    sam2.add_argument("--backend", choices=("onnx", "aoti"), default="onnx",
                      help="aoti also writes AOTInductor packages beside the ONNX graphs")
    sam2.add_argument("--out", required=True, type=Path, help="bundle directory")
    vlm = stages.add_parser("vlm", help="export a Qwen-VL fine-tune (vision, embedding, decoder "
                            "with KV cache) into a verified bundle, fp32 or quantized")
    source = vlm.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="Hugging Face model folder (config.json, "
                        "*.safetensors, tokenizer.json)")
    source.add_argument("--random-init", choices=("tiny", "small", "3b"),
                        help="build a random-init model and local tokenizer instead (small: "
                        "0.5B-class text; 3b: Qwen2.5-VL 3B's shapes, 7.5 GB in bf16)")
    vlm.add_argument("--family", choices=("qwen2_5_vl", "qwen2_vl", "qwen3_vl"),
                     default="qwen2_5_vl", help="model type of --random-init (default "
                     "qwen2_5_vl; qwen3_vl adds the deepstack inputs)")
    vlm.add_argument("--input-size", type=int, default=448, help="square VLM input side in "
                     "pixels, a multiple of patch x merge (28; Qwen3-VL 32); every image is "
                     "resized to it, or to its aspect's bucket with --aspect-buckets "
                     "(default 448)")
    vlm.add_argument("--aspect-buckets", action="store_true",
                     help="also export the vision graph at 4:3, 16:9 and their transposes at "
                     "the same pixel budget (Qwen's smart_resize of such frames), so frames "
                     "keep their aspect instead of being stretched to the square")
    vlm.add_argument("--precision", choices=("fp32", "fp16", "int8", "int4"), default="fp32",
                     help="fp16: all three graphs for GPUs (norms, Softmax and RoPE kept fp32, "
                     "float16 KV cache); int8: decoder per --int8-method; int4: decoder "
                     "MatMulNBits (the vision tower is dynamic int8 and the embedding table "
                     "fp16 in both); the bundle holds what runs (--keep-reference keeps the "
                     "fp32 graphs too)")
    vlm.add_argument("--keep-reference", action="store_true",
                     help="keep the verified fp32 graphs beside the lowered ones (what "
                     "`rau-rt export trt` and re-quantization start from)")
    vlm.add_argument("--int8-method", choices=("weight-only", "dynamic"), default="weight-only",
                     help="the int8 decoder: weight-only (MatMulNBits at 8 bits, activations "
                     "quantized per 32-value block: survives a trained model's outlier "
                     "channels) or dynamic (one activation scale per tensor: faster prefill, "
                     "refused by the gate where outliers break it)")
    vlm.add_argument("--block-size", type=int, default=32,
                     help="MatMulNBits (int4, weight-only int8) weights per scale")
    vlm.add_argument("--quantize-lm-head", action="store_true",
                     help="quantize the output projection too (default: kept fp32)")
    vlm.add_argument("--hidden-state", action="store_true",
                     help="add a last_hidden_state output to the decoder (seg-token heads)")
    vlm.add_argument("--new-tokens", type=int, default=24,
                     help="greedy tokens compared with transformers' generate (default 24)")
    vlm.add_argument("--max-context", type=int, default=4096,
                     help="longest prompt + generation the bundle's ranges allow")
    vlm.add_argument("--out", type=Path, required=True, help="bundle directory")
    vlm.add_argument("--json", action="store_true", help="print the summary as JSON")
    lint = stages.add_parser("lint", help="check ONNX graphs against TensorRT 10's ONNX parser")
    lint.add_argument("onnx", nargs="+", type=Path, help="ONNX graph files")
    lint.add_argument("--json", action="store_true", help="print the reports as JSON")


def run(args: argparse.Namespace, generate_sequence=None) -> int:
    """Run the chosen export stage; the exit code is 1 when a lint finds errors.

    `generate_sequence` (`rau_rt.synthetic.generate_sequence`, wired by `rau_rt.cli`: export
    sits below synthetic) makes the frames `export sam2` verifies on.
    """
    if args.stage == "trt":
        keep = None if args.keep_fp32 is None else tuple(
            op for op in args.keep_fp32.split(",") if op)
        if args.workspace_gb <= 0:
            raise InputError("--workspace-gb must be > 0")
        for entry in build_bundle(args.bundle, args.precision, args.workspace_gb,
                                  args.timing_cache, keep):
            print(f"{entry.graph}: {entry.file} ({entry.precision}, TensorRT "
                  f"{entry.tools['tensorrt']}, sm_{entry.tools['compute_capability']})")
        return 0
    if args.stage == "sam2":
        from rau_rt.export import sam2

        if generate_sequence is None:
            raise InputError("export sam2 needs a frame generator to verify on; run it "
                             "through `rau-rt export sam2` (rau_rt.cli wires the synthetic one)")
        return sam2.run_cli(args, generate_sequence)
    if args.stage == "vlm":
        from rau_rt.export import vlm

        summary = vlm.export_vlm(vlm.VlmExportConfig(
            out=args.out, model=args.model, random_init=args.random_init, family=args.family,
            input_size=args.input_size, aspect_buckets=args.aspect_buckets,
            precision=args.precision, int8_method=args.int8_method, block_size=args.block_size,
            quantize_lm_head=args.quantize_lm_head, hidden_state=args.hidden_state,
            keep_reference=args.keep_reference, new_tokens=args.new_tokens,
            max_context=args.max_context, progress=not args.json))
        print(json.dumps(summary, indent=2) if args.json else vlm.format_summary(summary))
        return 0
    from rau_rt.export import trt_build

    reports = []
    for path in args.onnx:
        if not path.is_file():
            raise InputError(f"{path}: no such ONNX file")
        reports.append(trt_build.lint(path))
    if args.json:
        print(json.dumps({str(r.path): r.to_dict() for r in reports}, indent=2))
    else:
        print("\n".join(r.format() for r in reports))
    return 0 if all(r.ok for r in reports) else 1
