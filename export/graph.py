"""Export a PyTorch module to one graph file of a bundle, verified through the runtime's loader.

The generic stage under the model-specific exporters (SAM2, VLM): `torch.export` once, then
write an ONNX graph (onnxruntime, and the TensorRT build's input), an AOTInductor package
(`.pt2`) or a `torch.export` archive (the eager engine), load it back with
`rau_rt.engines.registry.open_engine` and compare it with the eager fp32 module
(`rau_rt.export.verify`). The returned `GraphEntry` is what `manifest.json` records.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from rau_rt._version import __version__
from rau_rt.bundle import GraphEntry, file_sha256, tool_versions
from rau_rt.config import EngineConfig
from rau_rt.engines import registry
from rau_rt.engines.onnxruntime import PRECISION_METADATA_KEY
from rau_rt.engines.torch import DESCRIPTION_KEY, NUMPY_FLOAT, TORCH_FLOAT, describe
from rau_rt.errors import InputError
from rau_rt.export import fused_attention, trt_build
from rau_rt.export.verify import compare, require_parity
from rau_rt.types import TensorSpec

# backend -> file suffix of what `export_graph` writes for it
SUFFIX = {"onnxruntime": ".onnx", "aotinductor": ".pt2", "torch": ".ep.pt2"}
# opset 18: the dynamo exporter's default, and >= 17 keeps LayerNormalization one op (the
# TensorRT lint asks for it so fp16 LayerNorm stays accurate).
ONNX_OPSET = 18


@dataclass(frozen=True)
class DynamicDim:
    """A dimension that may vary at run time, within [min, max] (a TensorRT profile's range)."""

    name: str
    min: int
    max: int
    opt: int | None = None  # the profile's optimum; None: the example's size


def _cast(tensor: torch.Tensor, precision: str) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(getattr(torch, TORCH_FLOAT[precision]))
    return tensor


def _to_numpy(tensor: torch.Tensor, precision: str) -> np.ndarray:
    if tensor.is_floating_point():
        return tensor.detach().to(getattr(torch, NUMPY_FLOAT[precision])).cpu().numpy()
    return tensor.detach().cpu().numpy()


def _dynamic_shapes(example: Mapping[str, torch.Tensor],
                    dynamic: Mapping[str, Mapping[int, DynamicDim]]):
    dims: dict[str, torch.export.Dim] = {}
    shapes = {}
    for name in example:
        axes = {}
        for axis, dim in dynamic.get(name, {}).items():
            if dim.name not in dims:
                dims[dim.name] = torch.export.Dim(dim.name, min=dim.min, max=dim.max)
            axes[axis] = dims[dim.name]
        shapes[name] = axes or None
    return shapes


def _symbol_names(program, dynamic: Mapping[str, Mapping[int, DynamicDim]]) -> dict[str, str]:
    """torch's symbol for each dynamic input dimension ("s40") -> the name we gave it."""
    symbols: dict[str, str] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = placeholders[len(placeholders) - len(program.graph_signature.user_inputs):]
    for node, name in zip(user, program.graph_signature.user_inputs, strict=True):
        for axis, dim in dynamic.get(name, {}).items():
            symbols[str(node.meta["val"].shape[axis])] = dim.name
    return symbols


def _output_specs(program, output_names: Sequence[str], precision: str,
                  dynamic: Mapping[str, Mapping[int, DynamicDim]]) -> tuple[TensorSpec, ...]:
    """Output specs from the exported graph; a symbolic dim takes its input dimension's name."""
    symbols = _symbol_names(program, dynamic)
    values = [n.meta["val"] for n in program.graph.output_node().args[0]]
    if len(values) != len(output_names):
        raise InputError(f"the module returns {len(values)} outputs, output_names has "
                         f"{len(output_names)}: {list(output_names)}")
    specs = []
    for name, value in zip(output_names, values, strict=True):
        shape = tuple(d if isinstance(d, int) else symbols.get(str(d)) for d in value.shape)
        dtype = NUMPY_FLOAT[precision] if value.is_floating_point() else str(value.dtype)[6:]
        specs.append(TensorSpec(name, shape, dtype))
    return tuple(specs)


def _input_specs(example: Mapping[str, torch.Tensor], precision: str,
                 dynamic: Mapping[str, Mapping[int, DynamicDim]]) -> tuple[TensorSpec, ...]:
    specs = []
    for name, tensor in example.items():
        axes = dynamic.get(name, {})
        shape = tuple(axes[i].name if i in axes else size for i, size in enumerate(tensor.shape))
        specs.append(TensorSpec(name, shape, _to_numpy(tensor[:0], precision).dtype.name))
    return tuple(specs)


def _ranges(example: Mapping[str, torch.Tensor],
            dynamic: Mapping[str, Mapping[int, DynamicDim]]) -> dict[str, dict[str, list[int]]]:
    ranges = {}
    for name, axes in dynamic.items():
        opt = list(example[name].shape)
        low, high = list(opt), list(opt)
        for axis, dim in axes.items():
            low[axis], high[axis] = dim.min, dim.max
            if dim.opt is not None:
                opt[axis] = dim.opt
        ranges[name] = {"min": low, "opt": opt, "max": high}
    return ranges


def write_onnx(program: torch.export.ExportedProgram, example: Mapping[str, torch.Tensor],
               path: Path, output_names: Sequence[str], precision: str,
               dim_names: Mapping[str, str], variant: str | None = None) -> None:
    """ONNX graph (dynamo exporter, opset 18, weights inside the file) tagged with precision.

    Converts the program `export_graph` already traced, so each module is traced once, and
    renames torch's dynamic-dimension symbols ("s40") to ours ("batch") throughout the graph.
    `variant` "fused-attention" writes attention as ONNX Runtime's fused kernel
    (export/fused_attention.py).
    """
    table = None
    if variant == fused_attention.VARIANT:
        table = fused_attention.translation_table()
    elif variant is not None:
        raise InputError(f"variant {variant!r}: expected None or {fused_attention.VARIANT!r}")
    torch.onnx.export(program, tuple(example.values()), str(path), dynamo=True,
                      input_names=list(example), output_names=list(output_names),
                      opset_version=ONNX_OPSET, external_data=False, verbose=False,
                      custom_translation_table=table)
    model = onnx.load(str(path))
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in dim_names:
                dim.dim_param = dim_names[dim.dim_param]
    onnx.helper.set_model_props(model, {PRECISION_METADATA_KEY: precision})
    onnx.save(model, str(path))


def export_graph(module: torch.nn.Module, example: Mapping[str, torch.Tensor],
                 directory: str | Path, graph: str, backend: str, *,
                 output_names: Sequence[str], precision: str = "fp32", device: str = "cpu",
                 dynamic: Mapping[str, Mapping[int, DynamicDim]] | None = None,
                 source_checkpoint_sha256: str | None = None,
                 variant: str | None = None) -> GraphEntry:
    """Write `graph` for `backend` into `directory`, verify it, and return its manifest entry.

    Args:
        module: The model at fp32 (the parity reference); it is not modified.
        example: Input name -> example tensor (fp32 for float inputs), in forward's order.
        directory: The bundle directory (created if missing).
        graph: The graph's role in the bundle, e.g. "image_encoder".
        backend: "onnxruntime", "aotinductor" or "torch" (eager, a torch.export archive).
        output_names: One name per output of forward, in order.
        precision: "fp32", "fp16" or "bf16" (bf16: torch backends only).
        device: "cpu" or "cuda": where the graph is compiled (AOTInductor) and verified.
        dynamic: Input name -> {axis: DynamicDim}; other axes are fixed to the example's.
        source_checkpoint_sha256: sha256 of the checkpoint the weights came from.
        variant: "fused-attention" (ONNX only): attention as ONNX Runtime's fused op, written
            to `<graph>.fused.<precision>.onnx` (export/fused_attention.py).

    Raises:
        ParityError: the written graph disagrees with the eager module beyond the tolerance.
    """
    if backend not in SUFFIX:
        raise InputError(f"export_graph writes {sorted(SUFFIX)}, not {backend!r}")
    if precision not in TORCH_FLOAT or (backend == "onnxruntime" and precision == "bf16"):
        raise InputError(f"precision {precision!r} is not exported for {backend} (fp32, fp16; "
                         "bf16 for the torch backends); int8 comes from rau_rt.export.quantize")
    dynamic = dict(dynamic or {})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if variant is not None and backend != "onnxruntime":
        raise InputError(f"variant {variant!r} is an ONNX graph variant, not for {backend}")
    stem = graph if variant is None else f"{graph}.fused"
    path = directory / f"{stem}.{precision}{SUFFIX[backend]}"
    reference_module = copy.deepcopy(module).eval().to(device)
    with torch.inference_mode():
        reference = reference_module(*[t.to(device) for t in example.values()])
    reference = reference if isinstance(reference, tuple | list) else (reference,)
    reference_np = {n: r.float().cpu().numpy() for n, r in zip(output_names, reference,
                                                                  strict=True)}
    target = copy.deepcopy(module).eval().to(device=device,
                                              dtype=getattr(torch, TORCH_FLOAT[precision]))
    cast = {n: _cast(t, precision).to(device) for n, t in example.items()}
    program = torch.export.export(target, tuple(cast.values()),
                                  dynamic_shapes=_dynamic_shapes(cast, dynamic))
    inputs = _input_specs(cast, precision, dynamic)
    outputs = _output_specs(program, output_names, precision, dynamic)
    text = describe(inputs, outputs, precision, device)
    lint = None
    if backend == "onnxruntime":
        write_onnx(program, cast, path, output_names, precision,
                   _symbol_names(program, dynamic), variant)
        lint = trt_build.lint(path).to_dict()
    elif backend == "aotinductor":
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path),
            inductor_configs={"aot_inductor.metadata": {DESCRIPTION_KEY: text}})
    else:
        torch.export.save(program, str(path), extra_files={DESCRIPTION_KEY: text})
    feeds = {n: _to_numpy(t, precision) for n, t in cast.items()}
    with registry.open_engine(path, backend, EngineConfig(device=device),
                              precision=precision) as engine:
        parity = compare(reference_np, engine.run(feeds), precision)
        inputs, outputs = engine.inputs, engine.outputs
    require_parity(parity, str(path))
    parity["reference"] = f"torch {torch.__version__} eager fp32 on {device}"
    return GraphEntry(
        graph=graph, file=path.name, backend=backend, precision=precision,
        inputs=inputs, outputs=outputs, sha256=file_sha256(path),
        device="any" if backend == "onnxruntime" else device,
        source_checkpoint_sha256=source_checkpoint_sha256,
        exporter={"name": "rau_rt.export.graph.export_graph", "version": __version__,
                  **({"variant": variant, "variant_note": fused_attention.NOTE}
                     if variant else {})},
        tools=tool_versions(cuda=torch.version.cuda if device.startswith("cuda") else None),
        parity=parity, dynamic_ranges=_ranges(example, dynamic), lint=lint)
