"""Weight quantization of the VLM's ONNX graphs: int8 (weight-only or dynamic) and int4.

int8 has two methods. `weight-only` (the decoder's default) is ONNX Runtime's block-wise
`MatMulNBits` at 8 bits: one scale per 32 weights, activations quantized per 32-value block
inside the kernel (accuracy_level 4), so an activation outlier channel costs precision only in
its own block. `dynamic` (`quantize_dynamic`, MatMuls with constant weights) quantizes each
activation tensor with one scale at run time: the feasibility study's CPU choice (2.1x per
decode token on a 135M Llama, logit cosine 0.998) and the faster one at prefill, but a trained
LLM's outlier channels set that one scale and drown the other channels (0.937 prefill-logit
cosine on a trained 0.5B decoder, issue 19), so it stays for the vision tower, which passes its
gate with it, and on request for the decoder. int4 is `MatMulNBits` at 4 bits (2.2x per token
in the study). All read an fp32 graph and write a new file tagged with its precision; parity
against PyTorch is the caller's (rau_rt.export.vlm).

Measured on 12 layers of a 0.5B-class decoder's MLP MatMuls (896 x 4864, random weights; 2-core
EPYC, ONNX Runtime 1.32), ms per call, output cosine to fp32 on a random input:

| rows | fp32 | int8 dynamic | int8 weight-only | int4 |
|---|---|---|---|---|
| 1 (a decode token) | 18.4 | 7.1 (0.9973) | 8.6 (0.9993) | 5.4 (0.920) |
| 600 (a prefill) | 624 | 233 (0.9968) | 496 (0.9993) | 529 (0.917) |

Weight-only int8 with fp32 activations (accuracy_level 0) has no fast CPU kernel: 156 ms per
decode token there, slower than fp32. On the whole 0.5B-class decoder (`benchmarks.bench_vlm`)
the two int8 methods decode within 20 % of each other (49.7 vs 49.2 ms per token in one run,
57.7 vs 48.3 in the next) and dynamic's prefill is 1.2x faster. Quantized graphs are written
one weight at a time (`quantize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from rau_rt.engines.onnxruntime import PRECISION_METADATA_KEY
from rau_rt.errors import InputError
from rau_rt.export.vlm import weights as vlm_weights

# accuracy_level 4: MatMulNBits computes with int8 activations, one scale per block (int4: 2.2x
# vs 1.4x with level 0 per decode token in the feasibility study, same logit cosine 0.91 on
# random weights; int8 weights: level 0 has no fast kernel, see above).
NBITS_ACCURACY_LEVEL = 4
INT8_METHODS = ("weight-only", "dynamic")


@dataclass(frozen=True)
class QuantizeConfig:
    """How a graph is quantized.

    Attributes:
        precision: "int8" or "int4".
        method: int8's method: "weight-only" (MatMulNBits at 8 bits, block-wise scales) or
            "dynamic" (one activation scale per tensor at run time); int4 is weight-only.
        block_size: MatMulNBits weights per scale (32 default; 64/128 are smaller and coarser).
        symmetric: MatMulNBits without zero points.
        quantize_lm_head: whether the output projection is quantized too (it holds 14 % of a
            7B's weights at a 152k vocab but drives the argmax; off keeps it fp32).
        per_channel: dynamic int8 weights with one scale per output channel.
    """

    precision: str
    method: str = "weight-only"
    block_size: int = 32
    symmetric: bool = True
    quantize_lm_head: bool = False
    per_channel: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "int4"):
            raise InputError(f"quantize: precision {self.precision!r}; choose int8 or int4")
        if self.method not in INT8_METHODS or (self.precision == "int4"
                                               and self.method != "weight-only"):
            raise InputError(f"quantize: method {self.method!r} for {self.precision}; int8 "
                             f"takes one of {INT8_METHODS}, int4 is weight-only")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"quantize: block_size must be a power of two >= 16 "
                             f"(MatMulNBits), got {self.block_size}")


def lm_head_nodes(model: onnx.ModelProto, vocab_size: int) -> list[str]:
    """Names of the MatMul nodes that project to the vocabulary (the lm_head)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul"
            and len(node.input) > 1 and shapes.get(node.input[1], (0,))[-1] == vocab_size]


def quantize(source: str | Path, target: str | Path, config: QuantizeConfig,
             vocab_size: int | None = None) -> Path:
    """Quantize the fp32 ONNX graph `source` into `target` per `config`.

    Both methods write one weight at a time: each MatMul weight is read from the fp32 graph's
    data, quantized and written to `target` before the next is read. MatMulNBits (int4,
    weight-only int8) packs with ONNX Runtime's own kernels (those of its
    `MatMulNBitsQuantizer`, which holds the whole model); dynamic int8 (the vision tower's)
    writes the nodes and values of its `quantize_dynamic`. Tests check both equal to ONNX
    Runtime's whole-graph tools.

    Args:
        source: An fp32 graph written by rau_rt.export.vlm.graphs.write_onnx.
        target: The quantized graph's path.
        config: Precision and its parameters.
        vocab_size: Identifies the lm_head MatMul to keep in fp32 (None: no lm_head here).
    """
    source, target = Path(source), Path(target)
    model = onnx.load(str(source), load_external_data=False)
    keep = [] if (config.quantize_lm_head or vocab_size is None) else lm_head_nodes(
        model, vocab_size)
    quantizer = _quantize_dynamic if config.method == "dynamic" else _quantize_nbits
    quantizer(model, source.parent, target, config, set(keep))
    return target


def _tag(model: onnx.ModelProto, precision: str) -> None:
    """Record `precision` in the graph's metadata (the ONNX Runtime engine reads it)."""
    props = {p.key: p.value for p in model.metadata_props}
    props[PRECISION_METADATA_KEY] = precision
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)


@dataclass(frozen=True)
class _Linear:
    """A MatMul (or Gemm, as the TorchScript exporter writes a Linear on 2-D inputs) of an
    activation `x` by a constant 2-D fp32 weight: y = x @ W (+ bias)."""

    x: str
    weight: str  # the initializer; the quantized weight's name (`_Transposed` for a Gemm's)
    transposed: bool  # a Gemm with transB: the initializer holds W's transpose
    bias: str | None
    y: str
    name: str


def _linear(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> _Linear | None:
    """`node` as a _Linear, or None when it is not one (or its weight is not constant fp32)."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    weight = initializers.get(node.input[1])
    if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
        return None
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and (attributes.get("transA", 0) or attributes.get("alpha", 1.0)
                                   != 1.0 or attributes.get("beta", 1.0) != 1.0):
        return None
    transposed = bool(attributes.get("transB", 0))
    return _Linear(node.input[0], node.input[1], transposed,
                   node.input[2] if len(node.input) > 2 and node.input[2] else None,
                   node.output[0], node.name or node.output[0])


def _rewrite(model: onnx.ModelProto, directory: Path, target: Path, keep: set[str],
             bits: int, quantize_weight, emit) -> None:
    """Rewrite `model` (its weights in `directory`) into `target` with every _Linear not named
    in `keep` quantized, one weight at a time.

    `quantize_weight(name, W [K, N] fp32, writer)` writes the quantized weight's initializers
    and returns a handle; `emit(linear, handle, output)` returns the nodes computing `output`
    from `linear.x`. A bias becomes an Add after them. `bits` sizes the data (inline or
    external) up front.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes_in = list(graph.node)  # one wrapper per node: protobuf's are not stable objects
    linears = {i: linear for i, node in enumerate(nodes_in) if node.name not in keep
               and (linear := _linear(node, initializers)) is not None}
    packed = {linear.weight for linear in linears.values()}
    still_read = {name for i, node in enumerate(nodes_in) if i not in linears
                  for name in node.input}
    carried = [t for t in graph.initializer if t.name not in packed or t.name in still_read]
    total = (sum(vlm_weights.nbytes(t) for t in carried)
             + sum(vlm_weights.nbytes(initializers[n]) for n in packed) * bits // 32)
    written, nodes, made = [], [], {}
    with vlm_weights.WeightWriter(target, total) as writer:
        for tensor in carried:
            written.append(writer.tensor(tensor.name, vlm_weights.read(tensor, directory)))
        for i, node in enumerate(nodes_in):
            linear = linears.get(i)
            if linear is None:
                nodes.append(node)
                continue
            name = linear.weight + ("_Transposed" if linear.transposed else "")
            if name not in made:  # one quantized copy per weight, however many nodes read it
                weight = vlm_weights.read(initializers[linear.weight], directory)
                made[name] = quantize_weight(name, weight.T if linear.transposed else weight,
                                             written, writer)
            output = f"{linear.y}_MatMul" if linear.bias else linear.y
            nodes += emit(linear, made[name], output)
            if linear.bias:
                nodes.append(onnx.helper.make_node("Add", [output, linear.bias], [linear.y],
                                                   name=f"{linear.name}_bias"))
    del graph.initializer[:]
    graph.initializer.extend(written)
    del graph.node[:]
    graph.node.extend(nodes)


def _quantize_dynamic(model: onnx.ModelProto, directory: Path, target: Path,
                      config: QuantizeConfig, keep: set[str]) -> None:
    """Rewrite `model` (its weights in `directory`) with its linears (see _Linear), other than
    those named in `keep`, as dynamic int8, one weight at a time.

    The nodes and values are those of ONNX Runtime's `quantize_dynamic` (QInt8 symmetric
    weights, MatMulConstBOnly, Gemms as MatMul + Add; a test checks them equal): the activation
    goes through one DynamicQuantizeLinear per tensor (uint8, one scale per call), the weight
    is int8 with one scale (per output channel with `per_channel`), and MatMulInteger's int32
    result is cast back and scaled by the product of the two scales. ONNX Runtime fuses the
    pattern into DynamicQuantizeMatMul at load. `quantize_dynamic` itself holds the graph with
    its weights several times over (3.5 GB above its baseline on the 0.6 GB small vision
    tower).
    """
    activations: dict[str, tuple[str, str, str]] = {}

    def quantize_weight(name, weight, written, writer):
        absmax = np.abs(weight).max(axis=0 if config.per_channel else None)
        scale = (2 * absmax / 254).astype(np.float32)  # symmetric, [-127, 127]
        quantized = np.clip(np.rint(weight / np.where(scale == 0, 1, scale)), -127, 127)
        names = (f"{name}_quantized", f"{name}_scale", f"{name}_zero_point")
        written += [writer.tensor(names[0], quantized.astype(np.int8)),
                    writer.tensor(names[1], scale),
                    writer.tensor(names[2], np.zeros_like(scale, np.int8))]
        return names

    def emit(linear, names, output):
        nodes = []
        if linear.x not in activations:  # one quantization per activation, however many read it
            x = linear.x
            activations[x] = (f"{x}_quantized", f"{x}_scale", f"{x}_zero_point")
            nodes.append(onnx.helper.make_node("DynamicQuantizeLinear", [x],
                                               list(activations[x])))
        (xq, xs, xz), (wq, ws, wz) = activations[linear.x], names
        scales, integer = f"{linear.name}_quant_scales_mul:0", f"{output}_output_quantized"
        return [*nodes,
                onnx.helper.make_node("Mul", [xs, ws], [scales]),
                onnx.helper.make_node("MatMulInteger", [xq, wq, xz, wz], [integer],
                                      name=f"{linear.name}_quant"),
                onnx.helper.make_node("Cast", [integer], [f"{integer}_cast_output"],
                                      to=onnx.TensorProto.FLOAT),
                onnx.helper.make_node("Mul", [f"{integer}_cast_output", scales], [output])]

    _rewrite(model, directory, target, keep, 8, quantize_weight, emit)
    _tag(model, config.precision)
    onnx.save(model, str(target))  # the weights are written already


def _quantize_nbits(model: onnx.ModelProto, directory: Path, target: Path,
                    config: QuantizeConfig, keep: set[str]) -> None:
    """Rewrite `model` (its weights in `directory`) with its linears (see _Linear), other than
    those named in `keep`, as MatMulNBits, one weight at a time."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    bits, block = int(config.precision[3:]), config.block_size
    pack = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]

    def quantize_weight(name, weight, written, writer):
        k, n = weight.shape
        k_blocks = -(-k // block)
        weight = np.pad(weight, ((0, k_blocks * block - k), (0, 0)))
        packed = np.zeros((n, k_blocks, block * bits // 8), np.uint8)
        scales = np.zeros((n, k_blocks), np.float32)
        zero_points = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
        pack(packed, weight, scales, zero_points, block, n, k, config.symmetric)
        inputs = [f"{name}_Q{bits}", f"{name}_scales"]
        written += [writer.tensor(inputs[0], packed), writer.tensor(inputs[1], scales)]
        if not config.symmetric:
            inputs.append(f"{name}_zero_points")
            written.append(writer.tensor(inputs[2], zero_points))
        return inputs, k, n

    def emit(linear, handle, output):
        inputs, k, n = handle
        return [onnx.helper.make_node(
            "MatMulNBits", [linear.x, *inputs], [output], name=f"{linear.name}_Q{bits}",
            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
            accuracy_level=NBITS_ACCURACY_LEVEL)]

    _rewrite(model, directory, target, keep, bits, quantize_weight, emit)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _tag(model, config.precision)
    onnx.save(model, str(target))  # the weights are written already
