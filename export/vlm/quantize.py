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
the two int8 methods decode equally fast (49.7 vs 49.2 ms per token) and dynamic's prefill is
1.2x faster. MatMulNBits graphs are written one weight at a time (`quantize`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from rau_rt.engines.onnxruntime import PRECISION_METADATA_KEY
from rau_rt.errors import InputError
from rau_rt.export.trt_build import PROTOBUF_LIMIT
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

    MatMulNBits (int4, weight-only int8) is written one weight at a time: each MatMul weight is
    read from the fp32 graph's data, packed with ONNX Runtime's own kernels (those of its
    `MatMulNBitsQuantizer`, which holds the whole model; the results are identical, as a test
    checks) and written to `target` before the next is read. Dynamic int8 (the vision tower's
    default) is ONNX Runtime's `quantize_dynamic` on the whole graph.

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
    if config.method == "dynamic":
        large = sum(vlm_weights.nbytes(t) for t in model.graph.initializer) > PROTOBUF_LIMIT
        _quantize_dynamic(source, target, config, keep, large)
    else:
        _quantize_nbits(model, source.parent, target, config, set(keep))
    return target


def _tag(model: onnx.ModelProto, precision: str) -> None:
    """Record `precision` in the graph's metadata (the ONNX Runtime engine reads it)."""
    props = {p.key: p.value for p in model.metadata_props}
    props[PRECISION_METADATA_KEY] = precision
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)


def _quantize_dynamic(source: Path, target: Path, config: QuantizeConfig, keep: list[str],
                      large: bool) -> None:
    """ONNX Runtime's dynamic int8 of `source`'s MatMuls with constant weights into `target`
    (`large`: its weights go to `<file>.data`, as protobuf caps one file at 2 GiB)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a root WARNING advising shape-inference pre-processing; it only
    # helps static QDQ calibration, not dynamic quantization.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             use_external_data_format=large, op_types_to_quantize=["MatMul"],
                             per_channel=config.per_channel, nodes_to_exclude=keep,
                             extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
    model = onnx.load(str(target))
    _tag(model, config.precision)
    vlm_weights.data_file(target).unlink(missing_ok=True)  # onnx would append to it
    onnx.save(model, str(target), save_as_external_data=large,
              location=vlm_weights.data_file(target).name if large else None)


def _quantize_nbits(model: onnx.ModelProto, directory: Path, target: Path,
                    config: QuantizeConfig, keep: set[str]) -> None:
    """Rewrite `model` (its weights in `directory`) with every MatMul of a constant 2-D fp32
    weight, other than those named in `keep`, as MatMulNBits; weights go to `target`'s data."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    bits, block = int(config.precision[3:]), config.block_size
    pack = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes_in = list(graph.node)  # one wrapper per node: protobuf's are not stable objects
    chosen = {i for i, node in enumerate(nodes_in) if node.op_type == "MatMul"
              and node.name not in keep and len(node.input) > 1
              and (b := initializers.get(node.input[1])) is not None and len(b.dims) == 2
              and b.data_type == onnx.TensorProto.FLOAT}
    packed_names = {nodes_in[i].input[1] for i in chosen}
    still_read = {name for i, node in enumerate(nodes_in) if i not in chosen
                  for name in node.input}
    carried = [t for t in graph.initializer if t.name not in packed_names or t.name in still_read]
    total = (sum(vlm_weights.nbytes(t) for t in carried)
             + sum(vlm_weights.nbytes(initializers[n]) for n in packed_names) * bits // 32)
    written, nodes, made = [], [], {}
    with vlm_weights.WeightWriter(target, total) as writer:
        for tensor in carried:
            written.append(writer.tensor(tensor.name, vlm_weights.read(tensor, directory)))
        for i, node in enumerate(nodes_in):
            if i not in chosen:
                nodes.append(node)
                continue
            name = node.input[1]
            if name not in made:  # one packed copy per weight, however many MatMuls read it
                weight = vlm_weights.read(initializers[name], directory)
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
                made[name] = (inputs, k, n)
            inputs, k, n = made[name]
            nodes.append(onnx.helper.make_node(
                "MatMulNBits", [node.input[0], *inputs], list(node.output),
                name=f"{node.name}_Q{bits}" if node.name else "", domain="com.microsoft",
                K=k, N=n, bits=bits, block_size=block, accuracy_level=NBITS_ACCURACY_LEVEL))
    del graph.initializer[:]
    graph.initializer.extend(written)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    _tag(model, config.precision)
    onnx.save(model, str(target))  # the weights are written already
