"""The verified stages of `rau-rt export vlm` (rau_rt.export.vlm runs them in order).

The model is needed only by the first two: `export_fp32` writes the graphs and computes each
one's eager outputs, `eager_reference` transformers' greedy answer; the exporter then frees it,
so that the ONNX Runtime sessions of the checks never sit beside it. `check_fp32` compares
each fp32 graph with its eager outputs, `end_to_end` runs the fp32 bundle like the runtime
does against transformers' answer; `quantize_graphs` and `decoder_drift` make the lowered
graphs and measure them against the same references.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch

from rau_rt import ops
from rau_rt.bundle import load_bundle
from rau_rt.config import EngineConfig
from rau_rt.engines import registry
from rau_rt.export.verify import (
    VLM_GRAPH_TOLERANCES,
    VLM_GREEDY_EXACT,
    VLM_MIN_LOGIT_COSINE,
    VLM_PREFILL_LOGITS_ATOL,
    ParityError,
    compare,
    require_parity,
)
from rau_rt.export.vlm import fp16 as vlm_fp16
from rau_rt.export.vlm import graphs as vlm_graphs
from rau_rt.export.vlm import model as vlm_model
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.export.vlm import weights as vlm_weights
from rau_rt.export.vlm.quantize import QuantizeConfig, quantize
from rau_rt.profiling import release_freed_memory
from rau_rt.vlm_layout import (
    DECODER,
    EMBED,
    VISION,
    VlmLayout,
    cast_feeds,
    patchify,
    rope_positions,
)

# Where lowered graphs are checked: the exporter's engines run on CPU (`check_config`).
# fp16 graphs run there too: ONNX Runtime computes fp16 ops without a CPU kernel in fp32
# between inserted Casts, so CPU parity bounds the conversion's rounding, not a GPU's kernels.
VERIFIED_ON = "onnxruntime CPUExecutionProvider"


def check_config(graph_precision: str, **fields) -> EngineConfig:
    """The engine settings a graph of `graph_precision` is checked with (`fields`: more).

    fp32 and fp16 graphs are checked without weight prepacking: a session then maps the
    weights from the file instead of holding a repacked copy beside them while it opens, which
    was the export's peak (the 0.5B-class fp32 decoder: 2480 vs 1968 MiB for that session
    alone). Their MatMuls run the same fp32 kernels either way (fp16 ones between the Casts ONNX
    Runtime inserts on CPU); the logits move by ~3e-6, far inside the tolerances. int8 and int4
    kernels compute differently unpacked (MatMulNBits' packed path quantizes activations), so
    those graphs are checked as the runtime runs them.
    """
    return EngineConfig(prepack_weights=graph_precision not in ("fp32", "fp16"), **fields)


# graph -> (feeds, expected outputs): what each graph, and its lowered copy, is checked on
Checks = dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


def export_fp32(model, layout: VlmLayout, out: Path, ids: np.ndarray, patches: list[np.ndarray],
                ) -> tuple[dict[str, Path], Checks, list[np.ndarray]]:
    """Write the fp32 graphs, and compute each graph's eager outputs on the prompt to check
    them (and their lowered copies) against once the model is gone (`check_fp32`).

    The model may be held in its stored dtype: the references run in fp32
    (rau_rt.export.vlm.model.fp32_compute) and the graphs get the weights upcast
    (graphs.write_onnx).

    Returns:
        (graph -> fp32 file, graph -> (feeds, expected outputs) as numpy, the hidden states
        entering each decoder layer on the decoder's feeds: what a decoder too large to check
        whole is checked in parts against, `check_fp32`).
    """
    paths = {g: out / f"{g}.fp32.onnx" for g in (*layout.vision_graphs, EMBED, DECODER)}
    deep = layout.deepstack_layers
    vision = vlm_graphs.VisionGraph(model, layout.grid_thw, deepstack=bool(deep))
    embed = vlm_graphs.EmbedGraph(model, layout.image_token_id)
    decoder = vlm_graphs.DecoderGraph(model, layout.has_hidden_state, deep)
    kv, d = layout.num_kv_heads, layout.head_dim
    visual_names = ["image_features", "deepstack_features"][:2 if deep else 1]
    embed_names = ["inputs_embeds", "deepstack_embeds"][:2 if deep else 1]
    names = vlm_graphs.decoder_names(layout)[1]
    buckets = {layout.vision_graph(size): (
        vlm_graphs.VisionGraph(model, layout.grid_for(size), deepstack=bool(deep)), sample)
        for size, sample in bucket_samples(layout).items()}

    def run(module, feeds, outputs):
        result = module(*(torch.from_numpy(v) for v in feeds.values()))
        result = result if isinstance(result, tuple) else (result,)
        return {n: r.numpy() for n, r in zip(outputs, result, strict=True)}

    checks: Checks = {}
    with torch.inference_mode(), vlm_model.fp32_compute(model):
        visual = _concat_visual([vision(torch.from_numpy(p)) for p in patches], deep)
        embed_feeds = {"input_ids": ids,
                       **{n: v.numpy() for n, v in zip(visual_names, visual, strict=True)}}
        checks[VISION] = ({"pixel_values": patches[1]},
                          run(vision, {"pixel_values": patches[1]}, visual_names))
        checks[EMBED] = (embed_feeds, run(embed, embed_feeds, embed_names))
        embedded = checks[EMBED][1]
        prefill = {"inputs_embeds": embedded["inputs_embeds"],
                   "attention_mask": np.ones_like(ids),
                   "position_ids": rope_positions(ids, layout)[0],
                   **({"deepstack_embeds": embedded["deepstack_embeds"]} if deep else {}),
                   **{n: np.zeros((1, kv, 0, d), np.float32) for n in layout.past_names}}
        layer_inputs: list[np.ndarray] = []
        hooks = [layer.register_forward_pre_hook(
            lambda _m, args, kwargs: layer_inputs.append(
                (args[0] if args else kwargs["hidden_states"]).float().numpy().copy()),
            with_kwargs=True) for layer in decoder.language_model.layers]
        try:
            checks[DECODER] = (prefill, run(decoder, prefill, names))
        finally:
            for hook in hooks:
                hook.remove()
        for graph, (module, sample) in buckets.items():  # the aspect buckets' vision graphs
            checks[graph] = ({"pixel_values": sample},
                             run(module, {"pixel_values": sample}, visual_names))

    # The heap the eager runs freed goes back before the traces: it sat under the decoder's
    # TorchScript export (about 1 GB for a moment at the 0.5B class), and how much of it glibc
    # had kept varied from run to run.
    release_freed_memory()
    vlm_graphs.write_onnx(vision, {"pixel_values": torch.from_numpy(patches[0])}, paths[VISION],
                          visual_names, {}, "fp32")
    vlm_graphs.write_onnx(embed, {n: torch.from_numpy(v) for n, v in embed_feeds.items()},
                          paths[EMBED], embed_names,
                          {"input_ids": {0: "batch", 1: "sequence"},
                           "image_features": {0: "image_tokens"},
                           "deepstack_features": {1: "image_tokens"},
                           "inputs_embeds": {0: "batch", 1: "sequence"},
                           "deepstack_embeds": {1: "batch", 2: "sequence"}}, "fp32")
    # Traced with 4 new tokens after 3 cached ones, so no axis is specialized to 0 or 1.
    h = layout.hidden_size
    example = {"inputs_embeds": torch.randn(1, 4, h),
               "attention_mask": torch.ones(1, 7, dtype=torch.long),
               "position_ids": torch.arange(3, 7).expand(3, 1, 4).contiguous(),
               **({"deepstack_embeds": torch.randn(deep, 1, 4, h)} if deep else {}),
               **{n: torch.randn(1, kv, 3, d) for n in layout.past_names}}
    release_freed_memory()
    vlm_graphs.write_onnx(decoder, example, paths[DECODER], names,
                          vlm_graphs.decoder_dynamic_axes(layout), "fp32")
    for graph, (module, sample) in buckets.items():
        vlm_graphs.write_onnx(module, {"pixel_values": torch.from_numpy(sample)}, paths[graph],
                              visual_names, {}, "fp32")
    return paths, checks, layer_inputs


def check_fp32(paths: dict[str, Path], checks: Checks, layer_inputs: list[np.ndarray],
               max_part_mib: float | None = None) -> dict[str, dict]:
    """Each fp32 graph against its eager outputs, one ONNX Runtime session at a time.

    A decoder whose weights exceed `max_part_mib` is checked in parts of consecutive layers
    (`decoder_parts`), each fed the eager hidden state entering its first layer and compared
    on the hidden state entering the next part (or the logits), its layers' KV and nothing
    else: no session then holds more than a part's weights.
    """
    parity = {}
    for graph, (feeds, expected) in checks.items():
        parts = 1
        if graph == DECODER and max_part_mib is not None:
            parts = min(len(layer_inputs), math.ceil(graph_mib(paths[graph]) / max_part_mib))
        if parts > 1:
            parity[graph] = _check_decoder_in_parts(paths[graph], feeds, expected, layer_inputs,
                                                    parts)
            failed = [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for (a, b), ok in (
                (r["layers"], r["passed"]) for r in parity[graph]["parts"]) if not ok]
            if failed:
                raise ParityError(
                    f"{paths[graph]}: decoder layers {', '.join(failed)} differ from the "
                    f"PyTorch reference beyond the fp32 tolerance: " + str(
                        {n: o for n, o in parity[graph]["outputs"].items() if not o["passed"]}))
        else:
            with registry.open_engine(paths[graph], "onnxruntime", check_config("fp32"),
                                      precision="fp32") as engine:
                got = engine.run(feeds)
            parity[graph] = compare(expected, got, "fp32")
        require_parity(parity[graph], str(paths[graph]))
        parity[graph]["reference"] = f"torch {torch.__version__} eager fp32 on cpu"
        release_freed_memory()  # the session's heap, before the next graph's
    return parity


def graph_mib(path: Path) -> float:
    """A graph file's size with its external data, in MiB."""
    data = vlm_weights.data_file(path)
    return (path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 2**20


def decoder_parts(model: onnx.ModelProto, layers: int, parts: int,
                  ) -> list[tuple[int, int, str | None, str | None]]:
    """`parts` runs of consecutive decoder layers: (first layer, end layer, the tensor entering
    the first layer or None for layer 0, the tensor entering the end layer or None at the end).

    The tensor entering layer k is the one its input RMSNorm reads from outside the layer
    (TorchScript names nodes by module scope, "/language_model/layers.k/input_layernorm/...").
    """
    produced = {o: n.name for n in model.graph.node for o in n.output}

    def entering(k: int) -> str:
        scope = f"/language_model/layers.{k}/"
        found = {name for n in model.graph.node if n.name.startswith(scope + "input_layernorm/")
                 for name in n.input if name in produced and not produced[name].startswith(scope)
                 and "/Constant" not in produced[name]}
        if len(found) != 1:
            raise ParityError(f"decoder graph: cannot find the hidden state entering layer {k} "
                              f"(candidates {sorted(found)}); check it whole instead")
        return found.pop()

    bounds = [round(i * layers / parts) for i in range(parts + 1)]
    return [(a, b, entering(a) if a else None, entering(b) if b < layers else None)
            for a, b in itertools.pairwise(bounds)]


def _check_decoder_in_parts(path: Path, feeds: dict[str, np.ndarray],
                            expected: dict[str, np.ndarray], layer_inputs: list[np.ndarray],
                            parts: int) -> dict[str, object]:
    """The decoder graph `path` checked in `parts` runs of layers (see check_fp32): each run is
    extracted to a graph beside it that reads the same weight file, opened, run and deleted."""
    from onnx.utils import Extractor

    model = onnx.load(str(path), load_external_data=False)
    runs = decoder_parts(model, len(layer_inputs), parts)
    known = {v.name for v in model.graph.value_info}
    for _, _, entry, _ in runs:  # the extractor types a part's new inputs from value_info
        if entry and entry not in known:
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(
                entry, onnx.TensorProto.FLOAT, ["batch", "sequence", layer_inputs[0].shape[-1]]))
    extractor = Extractor(model)
    inputs = [i.name for i in model.graph.input]
    finals = [o.name for o in model.graph.output if not o.name.startswith("present.")]
    outputs, parts_done = {}, []
    for first, end, entry, leaving in runs:
        kv = [f"present.{i}.{kind}" for i in range(first, end) for kind in ("key", "value")]
        names = [*kv, *([leaving] if leaving else finals)]
        part = extractor.extract_model([*inputs, *([entry] if entry else [])], names)
        part_path = path.with_name(f"{path.stem}.layers-{first}-{end}.onnx")
        onnx.save(part, str(part_path))  # its weights stay in the decoder's data file
        del part
        try:
            with registry.open_engine(part_path, "onnxruntime", check_config("fp32"),
                                      precision="fp32") as engine:
                wanted = {s.name for s in engine.inputs}
                part_feeds = {n: v for n, v in feeds.items() if n in wanted}
                if entry:
                    part_feeds[entry] = layer_inputs[first]
                got = engine.run(part_feeds)
        finally:
            part_path.unlink(missing_ok=True)
        want = {n: expected[n] for n in kv} | (
            {leaving: layer_inputs[end]} if leaving else {n: expected[n] for n in finals})
        record = compare(want, got, "fp32")
        outputs.update(record["outputs"])
        parts_done.append({"layers": [first, end], "passed": record["passed"]})
    return {"precision": "fp32", "passed": all(p["passed"] for p in parts_done),
            "outputs": outputs, "parts": parts_done,
            "method": "in runs of consecutive layers, each fed the eager hidden state entering "
                      "it (the whole graph exceeds the part budget)"}


def bucket_samples(layout: VlmLayout) -> dict[tuple[int, int], np.ndarray]:
    """A sample image's patches at every aspect bucket's size (not `input_size`): what the
    bucket vision graphs are traced with and checked on."""
    fam = layout.family_constants
    samples = {}
    for size in layout.sizes[1:]:
        image = vlm_verify.sample_images(size)[0]
        pixels = ops.resize_for_vlm(image, size=size, channel_order="rgb", factor=fam.factor,
                                    mean=fam.mean, std=fam.std).pixels
        samples[size] = patchify(pixels, fam)[0]
    return samples


def _concat_visual(per_image: list, deepstack: int) -> tuple[torch.Tensor, ...]:
    """Every image's vision outputs concatenated along the token axis, in prompt order."""
    if not deepstack:
        return (torch.cat(per_image),)
    return (torch.cat([f for f, _ in per_image]), torch.cat([s for _, s in per_image], 1))


def _agreement(tokens: list[int], reference: list[int]) -> float:
    """Share of positions where two token sequences agree (the longer one's length counts)."""
    common = min(len(tokens), len(reference))
    same = sum(a == b for a, b in zip(tokens[:common], reference[:common], strict=True))
    return same / max(len(tokens), len(reference), 1)


class _VisionOutputs:
    """A GraphRunner over `bundle` whose vision graph answers from outputs computed before
    (in call order), so that a greedy run does not hold the vision tower beside the decoder.
    Every vision graph (the aspect buckets' too, unused here) declares the square one's
    inputs."""

    def __init__(self, vision, layout: VlmLayout, outputs: list[dict[str, np.ndarray]]) -> None:
        self.vision_entry, self.outputs, self.bundle = vision.entry(VISION), list(outputs), None
        self.vision_graphs = set(layout.vision_graphs)

    def entry(self, graph: str):
        return self.vision_entry if graph in self.vision_graphs else self.bundle.entry(graph)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.outputs.pop(0) if graph == VISION else self.bundle.run(graph, feeds)


@contextmanager
def _text_graphs(out: Path, layout: VlmLayout, patches: list[np.ndarray],
                 config: EngineConfig):
    """The bundle's embed and decoder graphs as a GraphRunner whose vision graph answers for
    `patches` (in order) from a session of its own, closed before the decoder's opens: a
    greedy or teacher-forced run never holds the vision tower beside the decoder (for fp16
    graphs on CPU, with the fp32 copies of the weights ONNX Runtime folds their Casts into)."""
    with load_bundle(out, config=config, graphs=[VISION]) as vision:
        seen = _VisionOutputs(vision, layout,
                              [vision.run(VISION, {"pixel_values": p}) for p in patches])
    release_freed_memory()
    with load_bundle(out, config=config, graphs=[EMBED, DECODER]) as bundle:
        seen.bundle = bundle
        yield seen


def eager_reference(model, hf, new_tokens: int) -> dict[str, object]:
    """transformers' answer on the prompt, in fp32 (the model may be held in its stored dtype):
    the last prefill logits, `generate`'s greedy tokens and the logits each was picked from."""
    with vlm_model.fp32_compute(model):
        logits, tokens, steps = vlm_verify.transformers_reference(model, hf, new_tokens)
    return {"prefill_logits": logits, "tokens": tokens, "step_logits": steps}


def end_to_end(out: Path, layout: VlmLayout, ids: np.ndarray, patches: list[np.ndarray],
               new_tokens: int, eager: dict[str, object]) -> dict[str, object]:
    """Prefill logits and greedy tokens through the fp32 bundle vs transformers (`eager`)."""
    prompt = ids.shape[1]
    reference_logits, generated = eager["prefill_logits"], eager["tokens"]
    with _text_graphs(out, layout, patches, check_config("fp32", precision="fp32")) as seen:
        tokens, logits = vlm_verify.greedy(seen, layout, ids, patches, new_tokens,
                                           min_new_tokens=new_tokens)
    result = {"prefill_logits_max_abs": float(np.max(np.abs(logits[0] - reference_logits))),
              "prefill_logits_cosine": vlm_verify.cosine(logits[0], reference_logits),
              "prompt_tokens": prompt, "tokens": tokens, "reference_tokens": generated,
              "token_agreement": _agreement(tokens, generated),
              "reference": f"transformers generate (greedy, {new_tokens} tokens)"}
    result["passed"] = (result["prefill_logits_max_abs"] <= VLM_PREFILL_LOGITS_ATOL["fp32"]
                        and ("fp32" not in VLM_GREEDY_EXACT or tokens == generated))
    if not result["passed"]:
        raise ParityError(f"{out}: fp32 graphs disagree with transformers on the prompt: "
                          f"prefill logits max abs {result['prefill_logits_max_abs']:.2e} "
                          f"(<= {VLM_PREFILL_LOGITS_ATOL['fp32']}), greedy {tokens} vs "
                          f"generate {generated}")
    return result


def quantize_graphs(out: Path, layout: VlmLayout, chosen: dict[str, str],
                    paths: dict[str, Path], checks: Checks, block_size: int,
                    quantize_lm_head: bool,
                    int8_method: str = "weight-only") -> dict[str, tuple[Path, dict]]:
    """Lower the graphs `chosen` names a non-fp32 precision for (int8/int4 quantized, fp16
    converted); gate the vision and embed graphs against their eager outputs (`checks`).

    int8 decoders take `int8_method`; int8 vision towers are quantized dynamically (they pass
    their gate so, and prefill-sized MatMuls run 2x faster that way than weight-only).

    Returns:
        graph -> (lowered file, parity record); the decoder's is completed by decoder_drift.
    """
    made: dict[str, tuple[Path, dict]] = {}
    for graph in (*layout.vision_graphs, EMBED, DECODER):
        precision = chosen[VISION if graph in layout.vision_graphs else graph]
        if precision == "fp32":
            continue
        target = out / f"{graph}.{precision}.onnx"
        if precision == "fp16":
            parity: dict[str, object] = {"precision": precision, "conversion":
                                         vlm_fp16.convert(paths[graph], target, graph, layout)}
        else:
            method = "weight-only" if precision == "int4" else (
                int8_method if graph == DECODER else "dynamic")
            config = QuantizeConfig(precision, method=method, block_size=block_size,
                                    quantize_lm_head=quantize_lm_head)
            quantize(paths[graph], target, config,
                     vocab_size=layout.vocab_size if graph == DECODER else None)
            parity = {"precision": precision, "quantization": config.__dict__}
        parity["reference_graph"] = paths[graph].name
        if graph != DECODER:
            feeds, expected = checks[graph]
            with registry.open_engine(target, "onnxruntime", check_config(precision),
                                      precision=precision) as engine:
                got = engine.run(cast_feeds(feeds, {s.name: s.dtype for s in engine.inputs}))
            tolerance = VLM_GRAPH_TOLERANCES[precision]
            parity.update(compare(expected, got, precision, tolerance))
            parity["gate"] = f"cosine of every output >= {tolerance.min_cosine}"
            parity["verified_on"] = VERIFIED_ON
            if not parity["passed"]:
                raise ParityError(f"{target}: outside its gate {parity['gate']}: {parity}")
        made[graph] = (target, parity)
        release_freed_memory()
    return made


def decoder_drift(out: Path, layout: VlmLayout, precision: str, ids: np.ndarray,
                  patches: list[np.ndarray], eager: dict[str, object]) -> dict[str, object]:
    """Logit cosine and top-1 agreement of the bundle's preferred (lowered) graphs with
    transformers in fp32 (`eager`), teacher-forced along `generate`'s greedy tokens; int8 and
    fp16 are gated (verify.py)."""
    tokens = eager["tokens"]
    with _text_graphs(out, layout, patches, check_config(precision)) as bundle:
        logits = vlm_verify.forced_logits(bundle, layout, ids, patches, tokens)
        vision = bundle.entry(VISION).precision
        method = (bundle.entry(DECODER).parity or {}).get("quantization", {}).get("method")
    reference = eager["step_logits"]
    cosines = [vlm_verify.cosine(a, b) for a, b in zip(logits, reference, strict=True)]
    top1 = [int(np.argmax(a) == np.argmax(b)) for a, b in zip(logits, reference, strict=True)]
    gate = VLM_MIN_LOGIT_COSINE[precision]
    drift = {"prefill_logits_cosine": cosines[0], "min_logits_cosine": min(cosines),
             "prefill_logits_max_abs": float(np.max(np.abs(logits[0] - reference[0]))),
             "top1_agreement": float(np.mean(top1)), "positions": len(top1),
             "reference": "transformers eager fp32, teacher-forced along generate's greedy "
                          f"tokens; this bundle as loaded (vision {vision})",
             "gate": None if gate is None else f"prefill logits cosine >= {gate}",
             "verified_on": VERIFIED_ON,
             "passed": gate is None or cosines[0] >= gate}
    if not drift["passed"]:
        hint = ("; dynamic int8 takes one activation scale per tensor, which a trained "
                "model's outlier channels break: --int8-method weight-only keeps them"
                if method == "dynamic" else "")
        raise ParityError(f"{out}: the {precision} decoder is outside its gate "
                          f"{drift['gate']}: {drift}{hint}")
    return drift
