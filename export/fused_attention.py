"""`aten.scaled_dot_product_attention` as ONNX Runtime's fused `com.microsoft.MultiHeadAttention`.

The dynamo exporter writes SDPA as MatMul -> Softmax -> MatMul: ONNX Runtime then materializes
the whole score matrix (SAM2.1-tiny at 1024 px: 4096 queries x 28,736 memory keys = 470 MB per
region and layer) and runs 1.3-1.5x slower than torch's fused kernel; three regions ran a
24 GiB machine out of memory. `MultiHeadAttention` without a mask or bias runs ONNX Runtime's
flash-attention kernel (MLAS on CPU, its own on CUDA): torch's speed, no score matrix.

The op is ONNX Runtime's, not ONNX's, so TensorRT cannot parse it: bundles keep the standard
graph beside the fused one (the TensorRT build's source), and the manifest lists the fused one
first for ONNX Runtime.
"""

from __future__ import annotations

import onnxscript
from onnx.defs import OpSchema
from onnxscript import opset18 as op

VARIANT = "fused-attention"
NOTE = ("attention as com.microsoft.MultiHeadAttention (ONNX Runtime's flash-attention kernel); "
        "not TensorRT-parsable: TensorRT builds from the standard graph")

_MSFT = onnxscript.values.Opset("com.microsoft", 1)
_PARAM = OpSchema.FormalParameter
# The part of ONNX Runtime's contrib schema this translation uses (separate 3-D Q, K, V).
_SCHEMA = OpSchema(
    "MultiHeadAttention", "com.microsoft", 1,
    inputs=[_PARAM("query", "T"), _PARAM("key", "T"), _PARAM("value", "T")],
    outputs=[_PARAM("output", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "attention heads"),
                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale")])
_MHA = onnxscript.values.Op(_MSFT, "MultiHeadAttention", _SCHEMA)


def _tokens_first(x):
    """[B, H, S, d] -> [B, S, H*d]."""
    moved = op.Transpose(x, perm=[0, 2, 1, 3])
    return op.Reshape(moved, op.Concat(op.Shape(moved, start=0, end=2),
                                       op.Constant(value_ints=[-1]), axis=0))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """The translation of aten SDPA (no mask, no dropout, not causal) into MultiHeadAttention."""
    if attn_mask is not None or is_causal or dropout_p:
        raise NotImplementedError("fused attention covers unmasked, non-causal SDPA without "
                                  "dropout (SAM2's attention); export the standard graph")
    heads = query.shape[1]
    if not isinstance(heads, int):
        raise NotImplementedError("fused attention needs a static head count")
    extra = {} if scale is None else {"scale": float(scale)}
    out = _MHA(_tokens_first(query), _tokens_first(key), _tokens_first(value),
               num_heads=heads, **extra)
    shape = op.Concat(op.Shape(out, start=0, end=2), op.Constant(value_ints=[heads, -1]), axis=0)
    return op.Transpose(op.Reshape(out, shape), perm=[0, 2, 1, 3])


def translation_table() -> dict:
    """For `torch.onnx.export(..., custom_translation_table=...)`."""
    import torch

    return {torch.ops.aten.scaled_dot_product_attention.default: scaled_dot_product_attention}
