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

from pathlib import Path

import onnx

from rau_rt.export.trt_build import FP32_SENSITIVE_OPS, convert_fp16
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
    """Write the fp16 copy of one fp32 VLM graph; returns how it was made (for the manifest)."""
    model = onnx.load(str(source), load_external_data=False)
    nodes = fp32_nodes(model)
    io = [v.name for v in (*model.graph.input, *model.graph.output)]
    half = float16_io(graph, layout)
    convert_fp16(source, target, keep_fp32=FP32_SENSITIVE_OPS, keep_fp32_nodes=nodes,
                 keep_io_types=[name for name in io if name not in half])
    return {"name": "rau_rt.export.trt_build.convert_fp16",
            "kept_fp32_ops": ",".join(FP32_SENSITIVE_OPS),
            "kept_fp32_scopes": ",".join(FP32_SCOPE_SUFFIXES),
            "kept_fp32_nodes": len(nodes), "float16_io": sorted(half)}
