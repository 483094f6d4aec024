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
decode token there, slower than fp32.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from rau_rt.engines.onnxruntime import PRECISION_METADATA_KEY
from rau_rt.errors import InputError

# accuracy_level 4: MatMulNBits computes with int8 activations, one scale per block (int4: 2.2x
# vs 1.4x with level 0 per decode token in the feasibility study, same logit cosine 0.91 on
# random weights; int8 weights: level 0 has no fast kernel, see above).
NBITS_ACCURACY_LEVEL = 4
INT8_METHODS = ("weight-only", "dynamic")
PROTOBUF_LIMIT = (2 << 30) - (64 << 20)  # 2 GiB less room for the graph itself


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

    Args:
        source: An fp32 graph written by rau_rt.export.vlm.graphs.write_onnx.
        target: The quantized graph's path.
        config: Precision and its parameters.
        vocab_size: Identifies the lm_head MatMul to keep in fp32 (None: no lm_head here).
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # matmul_nbits_quantizer calls logging.basicConfig(level=INFO) at import, which would print
    # one root-logger line per tensor of every later quantization: undo it.
    root.setLevel(level)
    for handler in root.handlers[len(handlers):]:
        root.removeHandler(handler)

    source, target = Path(source), Path(target)
    model = onnx.load(str(source))
    keep = [] if (config.quantize_lm_head or vocab_size is None) else lm_head_nodes(
        model, vocab_size)
    # quantize_dynamic logs a root WARNING advising shape-inference pre-processing; it only
    # helps static QDQ calibration, not weight-only or dynamic quantization.
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if config.method == "dynamic":
                large = sum(t.ByteSize() for t in model.graph.initializer) > PROTOBUF_LIMIT
                quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                                 use_external_data_format=large,
                                 op_types_to_quantize=["MatMul"],
                                 per_channel=config.per_channel, nodes_to_exclude=keep,
                                 extra_options={"MatMulConstBOnly": True})
                quantized = onnx.load(str(target))
            else:
                quantizer = MatMulNBitsQuantizer(model, bits=int(config.precision[3:]),
                                                 block_size=config.block_size,
                                                 is_symmetric=config.symmetric,
                                                 accuracy_level=NBITS_ACCURACY_LEVEL,
                                                 nodes_to_exclude=keep)
                quantizer.process()
                quantized = quantizer.model.model
    finally:
        root.setLevel(level)
    props = {p.key: p.value for p in quantized.metadata_props}
    props[PRECISION_METADATA_KEY] = config.precision
    del quantized.metadata_props[:]
    onnx.helper.set_model_props(quantized, props)
    # protobuf caps one file at 2 GiB: a 7B decoder's int4 weights (~4 GB with an fp32 lm_head)
    # go to `<file>.data` beside the graph.
    weights = sum(t.ByteSize() for t in quantized.graph.initializer)
    large = weights > PROTOBUF_LIMIT
    data = target.with_name(target.name + ".data")
    if data.exists():  # onnx appends to an existing data file; the weights are in memory now
        data.unlink()
    onnx.save(quantized, str(target), save_as_external_data=large,
              location=target.name + ".data" if large else None)
    return target
