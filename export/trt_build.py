"""TensorRT readiness lint and engine build for ONNX graphs (TensorRT 10 API).

`lint` runs anywhere (it needs only `onnx`): every node is checked against the operator table of
TensorRT 10's ONNX parser and its known constraints. `build` needs `tensorrt` and a GPU; it is
written to the TensorRT 10 Python API (strongly typed networks, optimization profiles, timing
cache) and is not executed in this project's CI, which cannot install TensorRT.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from rau_rt.engines.onnxruntime import PRECISION_METADATA_KEY
from rau_rt.errors import InputError

# The ONNX parser's operator support matrix: onnx/onnx-tensorrt `docs/operators.md` for TensorRT
# 10.15 ("supports operators in the inclusive range of opset 9 to opset 24"). Value: the data
# types the parser lists for the op, as letters: F = FP32/FP16/BF16, I = INT32/INT64,
# B = BOOL, Q = quantized (INT8/FP8/INT4, only through Q/DQ), U = UINT8.
_F, _FI, _FIB, _B = "F", "FI", "FIB", "B"
SUPPORTED_OPS: dict[str, str] = {
    **dict.fromkeys((
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization",
        "BlackmanWindow", "Ceil", "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh",
        "CumSum", "DeformConv", "Dropout", "Einsum", "Elu", "Erf", "Exp", "Floor", "Gemm",
        "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GridSample", "GroupNormalization",
        "GRU", "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "ImageScaler",
        "InstanceNormalization", "IsInf", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax",
        "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "MaxPool",
        "MeanVarianceNormalization", "Mish", "NonMaxSuppression", "NonZero", "ParametricSoftplus",
        "PRelu", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
        "Reciprocal", "Resize", "RMSNormalization", "RNN", "RoiAlign", "RotaryEmbedding", "Round",
        "STFT", "ScaledTanh", "Scan", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus",
        "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Upsample"), _F),
    **dict.fromkeys((
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater",
        "GreaterOrEqual", "IsNaN", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad",
        "Pow", "Range", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
        "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
        "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth", "Sub", "Sum",
        "TensorScatter", "TopK"), _FI),
    **dict.fromkeys((
        "Concat", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND",
        "Identity", "If", "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice",
        "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where"), _FIB),
    **dict.fromkeys(("And", "Not", "Or", "Xor"), _B),
    "Attention": "FQ", "Gelu": "FIQ", "Mean": "FIQ", "Cast": "FIBU", "CastLike": "FIBU",
    "Constant": "FIBQ", "ConstantOfShape": "FIBQ", "QuantizeLinear": "FQ",
    "DequantizeLinear": "FQ",
}
# Listed "N" in the same matrix (the parser rejects them; they need a plugin or a rewrite).
UNSUPPORTED_OPS = frozenset((
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
    "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool",
    "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique"))
# Added to the parser after TensorRT 10.0: fine on a current 10.x, rejected by older ones.
LATE_10X_OPS = frozenset(("Attention", "RotaryEmbedding", "TensorScatter", "RMSNormalization"))
# Comparisons produce BOOL whatever they compare: the matrix lists the types of their inputs.
BOOL_OUTPUT_OPS = frozenset(("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual",
                             "IsNaN", "IsInf"))
OPSET_RANGE = (9, 24)
PROTOBUF_LIMIT = (2 << 30) - (64 << 20)  # one file's bytes, less room for the graph
# LayerNormalization is one ONNX op from opset 17; older exports decompose it into
# ReduceMean/Sub/Pow/Sqrt/Div, which TensorRT runs in fp16 with visible error.
LAYERNORM_OPSET = 17

_P = onnx.TensorProto
_TYPE_LETTER = {_P.FLOAT: "F", _P.FLOAT16: "F", _P.BFLOAT16: "F", _P.DOUBLE: "F",
                _P.INT32: "I", _P.INT64: "I", _P.BOOL: "B", _P.UINT8: "U", _P.INT8: "Q",
                _P.INT4: "Q", _P.FLOAT8E4M3FN: "Q"}
_NEVER = {_P.COMPLEX64: "complex64", _P.COMPLEX128: "complex128", _P.STRING: "string"}


@dataclass(frozen=True)
class LintIssue:
    """One finding: `error` (the build fails), `warning` (accuracy or version risk), `note`."""

    severity: str
    node: str
    op: str
    message: str


@dataclass(frozen=True)
class LintReport:
    """What `lint` found in one graph."""

    path: str
    opset: int
    op_counts: dict[str, int]
    issues: tuple[LintIssue, ...]

    @property
    def ok(self) -> bool:
        """No errors (warnings and notes allowed)."""
        return not any(i.severity == "error" for i in self.issues)

    def to_dict(self) -> dict[str, object]:
        counts = Counter(i.severity for i in self.issues)
        return {"tensorrt_ready": self.ok, "opset": self.opset, "errors": counts["error"],
                "warnings": counts["warning"], "notes": counts["note"],
                "issues": [vars(i) for i in self.issues]}

    def format(self) -> str:
        """Human report: a verdict line, then one line per issue."""
        counts = Counter(i.severity for i in self.issues)
        verdict = "ready" if self.ok else "NOT ready"
        lines = [f"{self.path}: TensorRT 10 {verdict} (opset {self.opset}, "
                 f"{sum(self.op_counts.values())} nodes, {counts['error']} errors, "
                 f"{counts['warning']} warnings, {counts['note']} notes)"]
        lines += [f"  {i.severity}: {i.op} {i.node!r}: {i.message}" for i in self.issues]
        return "\n".join(lines)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those of If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _nodes(sub)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _is_zero_initializer(model: onnx.ModelProto, name: str) -> bool | None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return not onnx.numpy_helper.to_array(tensor).any()
    return None  # computed at run time: cannot tell


def lint(onnx_path: str | Path) -> LintReport:
    """Check an ONNX graph against TensorRT 10's ONNX parser.

    Checks: the default-domain opset is within the parser's range; every op is supported (custom
    domains need plugins); no complex or string tensors; INT64 tensors into ops TensorRT lists
    without INT64 (cast to INT32 at export); DOUBLE narrowed to FLOAT; Q/DQ zero points are zero;
    LayerNorm is the opset-17 op, not a decomposition.

    Returns:
        The report; `report.ok` is False when the TensorRT build would fail.
    """
    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    issues: list[LintIssue] = []
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except onnx.shape_inference.InferenceError as exc:
        # The lint still checks ops and declared types; intermediate types stay unknown.
        issues.append(LintIssue("note", "", "", f"shape inference failed ({exc})"))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        issues.append(LintIssue("error", "", "", f"opset {opset} is outside TensorRT 10's "
                                f"{OPSET_RANGE[0]}..{OPSET_RANGE[1]}; re-export with opset 18"))
    types = _value_types(model)
    for name, elem in types.items():
        if elem in _NEVER:
            issues.append(LintIssue("error", name, "tensor", f"{_NEVER[elem]} tensor; TensorRT "
                                    "has no such type (rewrite it real-valued, e.g. SAM2's RoPE)"))
    nodes = list(_nodes(model.graph))
    counts = Counter(n.op_type for n in nodes)
    for node in nodes:
        issues += _check_node(model, node, types)
    if opset < LAYERNORM_OPSET and "ReduceMean" in counts and "Pow" in counts:
        issues.append(LintIssue("warning", "", "ReduceMean+Pow",
                                f"opset {opset} < {LAYERNORM_OPSET}: LayerNorm is decomposed and "
                                "loses accuracy in fp16; re-export with opset >= 17"))
    return LintReport(str(path), opset, dict(counts), tuple(issues))


def _check_node(model: onnx.ModelProto, node: onnx.NodeProto,
                types: Mapping[str, int]) -> list[LintIssue]:
    op, name = node.op_type, node.name or (node.output[0] if node.output else "?")
    if node.domain not in ("", "ai.onnx"):
        return [LintIssue("error", name, op, f"custom domain {node.domain!r}: TensorRT needs a "
                          "plugin for it")]
    if op in UNSUPPORTED_OPS:
        return [LintIssue("error", name, op, "not supported by TensorRT 10's ONNX parser")]
    if op not in SUPPORTED_OPS:
        return [LintIssue("error", name, op, "not in TensorRT 10's ONNX operator matrix")]
    issues = []
    if op in LATE_10X_OPS:
        issues.append(LintIssue("warning", name, op, "parsed by recent TensorRT 10.x only "
                                "(absent from 10.0's matrix)"))
    allowed = SUPPORTED_OPS[op]
    for tensor in [*node.input, *node.output]:
        elem = types.get(tensor)
        if not tensor or elem is None or elem in _NEVER:
            continue
        if op in BOOL_OUTPUT_OPS and elem == _P.BOOL and tensor in node.output:
            continue
        letter = _TYPE_LETTER.get(elem)
        if elem == _P.DOUBLE:
            issues.append(LintIssue("note", name, op, f"{tensor!r} is DOUBLE; TensorRT narrows it "
                                    "to FLOAT (clamped to +-FLT_MAX)"))
        elif letter == "I" and "I" not in allowed:
            issues.append(LintIssue("note", name, op, f"{tensor!r} is "
                                    f"{onnx.TensorProto.DataType.Name(elem)} but TensorRT lists "
                                    f"{op} for float types only; cast to float or INT32 at export"))
        elif letter is not None and letter not in allowed and letter != "Q":
            issues.append(LintIssue("error", name, op, f"{tensor!r} has type "
                                    f"{onnx.TensorProto.DataType.Name(elem)}, which TensorRT's "
                                    f"{op} does not take"))
    if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
        if _is_zero_initializer(model, node.input[2]) is False:
            issues.append(LintIssue("error", name, op, "zero point must be 0 (symmetric "
                                    "quantization); quantize with symmetric=True"))
    if op == "Resize":
        for attribute in node.attribute:
            if attribute.name == "antialias" and attribute.i:
                issues.append(LintIssue("error", name, op, "antialias is not supported"))
    return issues


def require_ready(report: LintReport) -> None:
    """Raise `InputError` with the report when the graph would not build."""
    if not report.ok:
        raise InputError(f"not buildable with TensorRT 10:\n{report.format()}")


# Ops kept in fp32 inside fp16 engines when asked: their reductions (mean/variance, exp-sum)
# overflow or lose the small differences they normalize in fp16's 10-bit mantissa.
FP32_SENSITIVE_OPS = ("LayerNormalization", "Softmax")


def has_qdq(onnx_path: str | Path) -> bool:
    """Whether the graph carries explicit quantization (QuantizeLinear/DequantizeLinear)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in _nodes(model.graph))


def holds_fp32(onnx_path: str | Path) -> bool:
    """Whether any float input, output or weight of the graph is fp32: an fp16 build converts
    it first. (Judging by the first input alone built `vlm_embed`, whose input is token ids and
    whose table is fp32, in fp32 while the manifest said fp16.)"""
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    typed = [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)]
    weights = [t.data_type for t in graph.initializer]
    return onnx.TensorProto.FLOAT in typed + weights


def convert_fp16(onnx_path: str | Path, out: str | Path,
                 keep_fp32: Sequence[str] = FP32_SENSITIVE_OPS,
                 keep_fp32_nodes: Sequence[str] = (),
                 keep_io_types: bool | Sequence[str] = True, infer_shapes: bool = True) -> Path:
    """Write an fp16 copy of an fp32 graph for a strongly typed fp16 build.

    Strongly typed networks take their precision from the graph's types (TensorRT 10 deprecates
    the FP16 builder flag), so the graph itself becomes fp16. Inputs and outputs stay fp32 (Casts
    at the boundary; or only those named in `keep_io_types`, the others becoming float16), and
    `keep_fp32` op types and `keep_fp32_nodes` node names stay fp32 inside. `infer_shapes`
    False: the graph carries its value_info already (the converter types its Casts from it).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path))
    converted = convert_float_to_float16(
        model, keep_io_types=keep_io_types if isinstance(keep_io_types, bool)
        else list(keep_io_types), op_block_list=list(keep_fp32),
        node_block_list=list(keep_fp32_nodes), disable_shape_infer=not infer_shapes)
    # The source's metadata says fp32; the copy must not (the ORT engine reads it).
    onnx.helper.set_model_props(converted, {PRECISION_METADATA_KEY: "fp16"})
    # protobuf caps one file at 2 GiB (a 3B decoder in fp16 is 6 GB): larger weights go to
    # `<file>.data` beside the graph
    out = Path(out)
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)  # onnx would append to it
    large = sum(t.ByteSize() for t in converted.graph.initializer) > PROTOBUF_LIMIT
    onnx.save(converted, str(out), save_as_external_data=large,
              location=data.name if large else None, size_threshold=0)
    return out


def build(onnx_path: str | Path, out: str | Path, precision: str = "fp16",
          profiles: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
          workspace: int = 4 << 30, timing_cache: str | Path | None = None,
          keep_fp32: Sequence[str] = FP32_SENSITIVE_OPS) -> Path:
    """Build a serialized TensorRT engine from an ONNX graph on this host's GPU.

    Args:
        onnx_path: fp32 graph (fp32/fp16 builds), fp16 graph, or QDQ graph (int8 builds).
        out: Where the engine is written (`.engine`).
        precision: "fp32", "fp16" (an fp32 graph is converted first, `keep_fp32` ops stay
            fp32) or "int8" (the graph must carry Q/DQ nodes: explicit quantization, no
            calibrator).
        profiles: Input name -> (min, opt, max) shape; required for every dynamic input.
        workspace: Builder workspace pool limit in bytes.
        timing_cache: Read if present and written back after the build, so rebuilds of the same
            layers on the same GPU skip kernel timing.
        keep_fp32: Op types kept fp32 in fp16 builds; () converts everything.

    Raises:
        BackendUnavailableError: tensorrt or cuda-python does not import (says how to install).
        InputError: the graph fails the lint, lacks Q/DQ for int8, or a dynamic input has no
            profile.
    """
    from rau_rt.engines.tensorrt import import_tensorrt

    trt = import_tensorrt()
    onnx_path, out = Path(onnx_path), Path(out)
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"precision: expected fp32, fp16 or int8, got {precision!r}")
    if precision == "int8" and not has_qdq(onnx_path):
        raise InputError(f"{onnx_path}: int8 engines are built from Q/DQ graphs (explicit "
                         "quantization); quantize the bundle first (rau_rt.export.quantize)")
    source = onnx_path
    if precision == "fp16" and holds_fp32(onnx_path):
        # Kept beside the engine: the graph TensorRT actually parsed, for inspection.
        source = convert_fp16(onnx_path, out.with_name(out.stem + ".trt-input.onnx"), keep_fp32)
    require_ready(lint(source))

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise InputError(f"{source}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    profile = builder.create_optimization_profile()
    profiles = dict(profiles or {})
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name in profiles:
            low, opt, high = profiles[tensor.name]
            profile.set_shape(tensor.name, tuple(low), tuple(opt), tuple(high))
        elif any(d < 0 for d in tensor.shape):
            raise InputError(f"input {tensor.name!r} has dynamic shape {tuple(tensor.shape)} "
                             "but no profile; record its range in the manifest (dynamic_ranges)")
    if profiles:
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        cache_path = Path(timing_cache)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise InputError(f"{source}: TensorRT could not build an engine (see its log above)")
    out.write_bytes(bytes(serialized))
    if cache is not None:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return out
