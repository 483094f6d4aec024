"""The three VLM graphs as torch modules with explicit tensors in and out, and their ONNX export.

`VisionGraph` (patches -> image features, one fixed grid), `EmbedGraph` (ids + image features
-> input embeddings) and `DecoderGraph` (embeddings + M-RoPE positions + mask + past KV ->
last logits + present KV [+ last hidden state]) follow the contract in
`rau_rt.vlm_layout.VlmLayout`. They are exported with the TorchScript exporter
(`dynamo=False`): the Qwen2.5-VL vision tower's window attention is data-dependent
(`grid_thw.tolist()`, `torch.split(lengths.tolist())`) and fails in torch.export, and the other
two graphs export in ~0.3 s that way instead of ~8 s through dynamo on 2 cores (the feasibility
study's decoder; both exporters agree with eager to 2e-6 there).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch

from rau_rt.engines.onnxruntime import PRECISION_METADATA_KEY
from rau_rt.export.vlm import weights as vlm_weights
from rau_rt.types import TensorSpec
from rau_rt.vlm_layout import VlmLayout

ONNX_OPSET = 18


class VisionGraph(torch.nn.Module):
    """pixel_values [grid_h*grid_w, patch_dim] -> image_features [tokens, hidden] for one image
    (and deepstack_features [L, tokens, hidden] when `deepstack`, Qwen3-VL).

    The grid is a constant of the graph: the exporter traces it with this grid only.
    """

    def __init__(self, model: torch.nn.Module, grid_thw: Sequence[int],
                 deepstack: bool = False) -> None:
        super().__init__()
        self.visual = model.model.visual
        self.deepstack = deepstack
        self.register_buffer("grid_thw", torch.tensor([list(grid_thw)], dtype=torch.long),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.visual(pixel_values, grid_thw=self.grid_thw)
        if self.deepstack:
            return out.pooler_output, torch.stack(out.deepstack_features)
        return out.pooler_output


class EmbedGraph(torch.nn.Module):
    """input_ids [B, S] + image_features [N, hidden] -> inputs_embeds [B, S, hidden]
    (+ deepstack_features [L, N, hidden] -> deepstack_embeds [L, B, S, hidden] with deepstack).

    The k-th image-pad token takes row k of image_features (transformers' masked_scatter
    order). Written as a gather from [zero row; features] so that N = 0 (decode steps,
    text-only prompts) is an ordinary shape: CumSum + Gather + Where, no data-dependent size.
    Deepstack rows are gathered the same way; positions without an image take the zero row.
    """

    def __init__(self, model: torch.nn.Module, image_token_id: int) -> None:
        super().__init__()
        self.embed_tokens = model.model.language_model.embed_tokens
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor,
                deepstack_features: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embed_tokens(input_ids)
        is_image = input_ids == self.image_token_id
        index = torch.cumsum(is_image.flatten().long(), 0) * is_image.flatten().long()
        rows = torch.cat([torch.zeros_like(embeds[0, :1]), image_features.to(embeds.dtype)])
        gathered = rows[index].reshape(embeds.shape)
        merged = torch.where(is_image.unsqueeze(-1), gathered, embeds)
        if deepstack_features is None:
            return merged
        layers = deepstack_features.to(embeds.dtype)
        zero = torch.zeros_like(embeds[0, :1]).expand(layers.shape[0], 1, -1)  # N may be 0
        deep = torch.cat([zero, layers], 1)[:, index]  # [L, B*S, hidden]; row 0 is zero
        return merged, deep.reshape(layers.shape[0], *embeds.shape)


class DecoderGraph(torch.nn.Module):
    """The text decoder with its KV cache as plain tensors (see VlmLayout for the contract).

    With `deepstack_layers` L > 0 (Qwen3-VL) it takes deepstack_embeds [L, B, S, hidden] after
    position_ids and adds row l to the hidden states after layer l, densely: transformers adds
    the rows at the visual positions only, and the embed graph put zeros everywhere else.
    """

    def __init__(self, model: torch.nn.Module, hidden_state: bool,
                 deepstack_layers: int = 0) -> None:
        super().__init__()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers
        self.hidden_state = hidden_state
        self.deepstack_layers = deepstack_layers

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        past = rest[1:] if self.deepstack_layers else rest
        cache = DynamicCache(config=self.language_model.config)
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        kwargs = {}
        if self.deepstack_layers:
            kwargs = {"deepstack_visual_embeds": list(rest[0].unbind(0)),
                      "visual_pos_masks": None}
        with _dense_deepstack(self.language_model, bool(self.deepstack_layers)):
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=True,
                                      **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -1, :])
        present = []
        for layer in range(self.num_layers):
            present += [cache.layers[layer].keys, cache.layers[layer].values]
        return (logits, *present, hidden) if self.hidden_state else (logits, *present)


@contextmanager
def _dense_deepstack(language_model: torch.nn.Module, active: bool):
    """Swap Qwen3-VL's masked deepstack add (boolean indexing: a data-dependent NonZero in the
    graph) for a dense add of [B, S, hidden] rows for the duration of one forward."""
    if not active:
        yield
        return
    language_model._deepstack_process = lambda hidden, _mask, rows: hidden + rows.to(hidden.dtype)
    try:
        yield
    finally:
        del language_model._deepstack_process


def kv_names(num_layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(past input names, present output names), key then value per layer."""
    past = tuple(f"past_key_values.{i}.{kind}" for i in range(num_layers)
                 for kind in ("key", "value"))
    return past, tuple(name.replace("past_key_values", "present") for name in past)


def decoder_names(layout: VlmLayout) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph, in forward's order."""
    deepstack = ["deepstack_embeds"] if layout.deepstack_layers else []
    inputs = ["inputs_embeds", "attention_mask", "position_ids", *deepstack, *layout.past_names]
    outputs = ["logits", *layout.present_names]
    return inputs, outputs + (["last_hidden_state"] if layout.has_hidden_state else [])


def decoder_dynamic_axes(layout: VlmLayout) -> dict[str, dict[int, str]]:
    """Dynamic axes: batch, new tokens, past tokens (and their sum)."""
    axes = {"inputs_embeds": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {1: "batch", 2: "sequence"}, "logits": {0: "batch"}}
    if layout.deepstack_layers:
        axes["deepstack_embeds"] = {1: "batch", 2: "sequence"}
    for name in layout.past_names:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in layout.present_names:
        axes[name] = {0: "batch", 2: "total_sequence"}
    if layout.has_hidden_state:
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    return axes


def write_onnx(module: torch.nn.Module, example: Mapping[str, torch.Tensor], path: Path,
               output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]],
               precision: str) -> Path:
    """Export `module` with the TorchScript exporter and tag the file with its precision.

    The exporter traces the graph without its weights (`export_params=False`) and they are
    written here one tensor at a time, straight from the module's parameters: with the weights,
    the exporter held three more copies of them (the 0.5B-class decoder's 1.9 GB of weights
    took the export's peak RSS from 2.8 to 9.7 GB). Its constant folding is off, since it would
    fold weights into unnamed inputs, so each Linear weight arrives behind a Transpose; the
    transposed weight is written instead and the Transpose dropped, as the folding did. The
    other constant subgraphs it would have folded (a few Unsqueeze and Sqrt) are left to
    ONNX Runtime's load-time folding. Weights over `weights.EXTERNAL_DATA_BYTES` go to
    `<file>.data`.

    A model held in bf16 or fp16 (rau_rt.export.vlm.model.load with `stored_dtype`) is traced
    with fp32 stand-ins for its parameters (untouched zero pages: no memory; the trace needs
    shapes, not values) and its weights are written upcast to fp32, so the graph
    is the fp32 graph of the stored weights.
    """
    with warnings.catch_warnings(), _standin_weights(module):
        # The TorchScript exporter is deprecated in favour of dynamo, which cannot trace the
        # vision tower (module docstring); tracer warnings flag the fixed grid we intend.
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(example.values()), str(path), dynamo=False,
                          input_names=list(example), output_names=list(output_names),
                          dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                          opset_version=ONNX_OPSET, do_constant_folding=False,
                          export_params=False)
    model = onnx.load(str(path))
    _attach_weights(model, module, set(example), path)
    onnx.helper.set_model_props(model, {PRECISION_METADATA_KEY: precision})
    onnx.save(model, str(path))
    return path


@contextmanager
def _standin_weights(module: torch.nn.Module):
    """Swap every floating parameter under `module` for an fp32 stand-in of its shape, for the
    span of the context (tied parameters share one stand-in).

    The stand-ins are views into one arena, allocated and never written but for one element
    per stand-in: the system hands it out as zero pages, which reading does not make
    resident, so tracing a 3B-class decoder costs no weight memory. (Broadcast stand-ins did
    not: a Linear copies a broadcast weight to a dense one, 1.2 GB for a 3B lm_head.) Stand-in
    k starts at element k and holds k x 1e-20 there: the exporter merges initializers of equal
    value, and values this small keep the trace's activations near zero.
    """
    owners = [(owner, name, parameter) for owner in module.modules()
              for name, parameter in owner._parameters.items()
              if parameter is not None and parameter.is_floating_point()]
    unique = list({id(p): p for _, _, p in owners}.values())
    if not unique:
        yield
        return
    arena = torch.empty(max(p.numel() for p in unique) + len(unique), dtype=torch.float32)
    standins = {}
    for k, parameter in enumerate(unique):
        arena[k] = (k + 1) * 1e-20
        standins[id(parameter)] = torch.nn.Parameter(
            arena[k:k + parameter.numel()].view(parameter.shape), requires_grad=False)
    for owner, name, parameter in owners:
        owner._parameters[name] = standins[id(parameter)]
    try:
        yield
    finally:
        for owner, name, parameter in owners:
            owner._parameters[name] = parameter


def io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """A graph file's (inputs, outputs), read from the graph alone: what an ONNX Runtime
    session reports, without loading the weights (12 GB for a 3B-class fp32 decoder)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else
                      (d.dim_param if d.HasField("dim_param") else None)
                      for d in tensor.shape.dim)
        return TensorSpec(value.name, shape,
                          onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name)

    initializers = {t.name for t in graph.initializer}
    return (tuple(spec(v) for v in graph.input if v.name not in initializers),
            tuple(spec(v) for v in graph.output))


def _attach_weights(model: onnx.ModelProto, module: torch.nn.Module, feeds: set[str],
                    path: Path) -> None:
    """Turn the graph's weight inputs into initializers holding `module`'s tensors."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    graph = model.graph
    weights = [i.name for i in graph.input if i.name not in feeds]
    missing = [name for name in weights if name not in tensors]
    if missing:
        raise RuntimeError(f"{path.name}: the traced graph reads weights the module does not "
                           f"name: {missing[:5]}")
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    total = sum(tensors[n].numel() * (4 if tensors[n].is_floating_point() else
                                      tensors[n].element_size()) for n in weights)
    dropped: set[str] = set()
    renamed: dict[str, str] = {}
    with vlm_weights.WeightWriter(path, total) as writer:
        for name in weights:
            tensor = tensors[name].detach()
            users = readers.get(name, [])
            if tensor.ndim == 2 and users and all(_is_transpose_2d(n) for n in users):
                tensor, name = tensor.t(), f"{name}.T"
                for node in users:  # the Transposes' readers take the transposed weight
                    dropped.add(node.output[0])
                    renamed[node.output[0]] = name
            # a stored bf16/fp16 weight upcast, a transposed one laid out, by blocks of rows
            graph.initializer.append(writer.from_torch(name, tensor))
    kept = [n for n in graph.node if not (n.output and n.output[0] in dropped)]
    for node in kept:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    inputs = [i for i in graph.input if i.name in feeds]
    del graph.input[:]
    graph.input.extend(inputs)


def _is_transpose_2d(node: onnx.NodeProto) -> bool:
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    return node.op_type == "Transpose" and perm in ([], [[1, 0]])
