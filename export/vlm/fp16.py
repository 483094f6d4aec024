"""fp16 VLM graphs for GPUs: the fp32 graphs converted, precision-sensitive parts kept fp32.

Conversion is SAM2's (`rau_rt.export.trt_build.convert_fp16`, ONNX Runtime's float16 tool):
LayerNormalization and Softmax stay fp32 by op type; by node, every node of an RMSNorm module
(`*norm` scopes: its mean of squares overflows fp16 past |x| = 256, and real Qwen decoders
carry activations in the thousands) and of the text rotary embedding (`rotary_emb`: position x
frequency angles; fp16's 11-bit mantissa leaves an error of 1 radian at position 2048). The
KV cache crosses the graph boundary as float16 (half the memory of the cache, no casts of the
whole cache per token); every other input and output stays float32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from rau_rt.export.trt_build import FP32_SENSITIVE_OPS, convert_fp16
from rau_rt.export.vlm import weights as vlm_weights
from rau_rt.vlm_layout import DECODER, VlmLayout

# Module scopes (TorchScript export node names are "/module/path/Op_n") kept fp32.
FP32_SCOPE_SUFFIXES = ("norm", "rotary_emb")


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes inside a kept-fp32 module scope (FP32_SCOPE_SUFFIXES)."""
    kept = []
    for node in model.graph.node:
        scopes = node.name.split("/")[:-1]
        if any(s.endswith(FP32_SCOPE_SUFFIXES) for s in scopes):
            kept.append(node.name)
    return kept


def float16_io(graph: str, layout: VlmLayout) -> set[str]:
    """Inputs/outputs of `graph` that become float16: the decoder's KV cache only."""
    return set(layout.past_names) | set(layout.present_names) if graph == DECODER else set()


def convert(source: Path, target: Path, graph: str, layout: VlmLayout) -> dict[str, object]:
    """Write the fp16 copy of one fp32 VLM graph; returns how it was made (for the manifest).

    The converter (`convert_fp16`) holds a graph with its weights several times over (2.7 GB
    above its baseline for the 0.5B-class model's 545 MB embedding table, 6 GB for a 3B's
    decoder would be 30), so it converts the graph with one-element stand-ins for the weights,
    its shape inference run before on the real graph, and each weight is then converted with
    the converter's own function, a block of rows at a time, as the stand-in's converted type
    says. A test checks the result equal to the converter's on the whole graph.
    """
    from onnxruntime.transformers.float16 import convert_np_to_float16

    source, target = Path(source), Path(target)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(source), load_external_data=False))
    nodes = fp32_nodes(model)
    io = [v.name for v in (*model.graph.input, *model.graph.output)]
    half = float16_io(graph, layout)
    weights = {t.name: t for t in model.graph.initializer}
    standins = [onnx.numpy_helper.from_array(
        np.zeros((1,) * len(t.dims), onnx.helper.tensor_dtype_to_np_dtype(t.data_type)), t.name)
        for t in weights.values()]
    del model.graph.initializer[:]
    model.graph.initializer.extend(standins)
    with tempfile.TemporaryDirectory() as tmp:
        light = Path(tmp) / "graph.onnx"
        onnx.save(model, str(light))
        convert_fp16(light, light, keep_fp32=FP32_SENSITIVE_OPS, keep_fp32_nodes=nodes,
                     keep_io_types=[name for name in io if name not in half],
                     infer_shapes=False)
        converted = onnx.load(str(light))
    fp16 = onnx.TensorProto.FLOAT16
    sizes = {t.name: int(np.prod(weights[t.name].dims)) * (2 if t.data_type == fp16 else 4)
             if t.name in weights else t.ByteSize() for t in converted.graph.initializer}
    written = []
    with vlm_weights.WeightWriter(target, sum(sizes.values())) as writer:
        for tensor in converted.graph.initializer:
            if tensor.name not in weights:  # one the converter added
                written.append(writer.tensor(tensor.name, onnx.numpy_helper.to_array(tensor)))
                continue
            values = vlm_weights.mapped(weights[tensor.name], source.parent)
            convert = ((lambda rows: convert_np_to_float16(np.asarray(rows)))
                       if tensor.data_type == fp16 and values.dtype == np.float32
                       else np.asarray)
            written.append(writer.rows(tensor.name, values, convert))
    del converted.graph.initializer[:]
    converted.graph.initializer.extend(written)
    onnx.save(converted, str(target))  # the weights are written already
    return {"name": "rau_rt.export.trt_build.convert_fp16",
            "kept_fp32_ops": ",".join(FP32_SENSITIVE_OPS),
            "kept_fp32_scopes": ",".join(FP32_SCOPE_SUFFIXES),
            "kept_fp32_nodes": len(nodes), "float16_io": sorted(half)}
