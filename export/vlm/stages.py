"""The verified stages of `rau-rt export vlm` (rau_rt.export.vlm runs them in order).

`export_fp32` writes the three graphs and compares each with its eager module; `end_to_end`
runs the fp32 bundle like the runtime does and compares with transformers; `quantize_graphs`
and `decoder_drift` make the int8/int4 graphs and measure them against the fp32 ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.export.vlm.quantize import QuantizeConfig, quantize
from rau_rt.vlm_layout import (
    DECODER,
    EMBED,
    VISION,
    VlmLayout,
    cast_feeds,
    patchify,
    rope_positions,
)

# Where lowered graphs are checked: the exporter's engines use the default EngineConfig (CPU).
# fp16 graphs run there too: ONNX Runtime computes fp16 ops without a CPU kernel in fp32
# between inserted Casts, so CPU parity bounds the conversion's rounding, not a GPU's kernels.
VERIFIED_ON = "onnxruntime CPUExecutionProvider"


def export_fp32(model, layout: VlmLayout, out: Path, ids: np.ndarray,
                 patches: list[np.ndarray]) -> tuple[dict[str, Path], dict[str, dict]]:
    """Write the three fp32 graphs and compare each with its eager module on the prompt."""
    paths = {g: out / f"{g}.fp32.onnx" for g in (*layout.vision_graphs, EMBED, DECODER)}
    deep = layout.deepstack_layers
    vision = vlm_graphs.VisionGraph(model, layout.grid_thw, deepstack=bool(deep))
    embed = vlm_graphs.EmbedGraph(model, layout.image_token_id)
    decoder = vlm_graphs.DecoderGraph(model, layout.has_hidden_state, deep)
    h, kv, d = layout.hidden_size, layout.num_kv_heads, layout.head_dim
    torch_patches = [torch.from_numpy(p) for p in patches]
    visual_names = ["image_features", "deepstack_features"][:2 if deep else 1]
    embed_names = ["inputs_embeds", "deepstack_embeds"][:2 if deep else 1]
    vlm_graphs.write_onnx(vision, {"pixel_values": torch_patches[0]}, paths[VISION],
                          visual_names, {}, "fp32")
    with torch.inference_mode():
        per_image = [vision(p) for p in torch_patches]
    visual = _concat_visual(per_image, deep)
    torch_ids = torch.from_numpy(ids)
    embed_feeds = {"input_ids": torch_ids, **dict(zip(visual_names, visual, strict=True))}
    vlm_graphs.write_onnx(embed, embed_feeds, paths[EMBED], embed_names,
                          {"input_ids": {0: "batch", 1: "sequence"},
                           "image_features": {0: "image_tokens"},
                           "deepstack_features": {1: "image_tokens"},
                           "inputs_embeds": {0: "batch", 1: "sequence"},
                           "deepstack_embeds": {1: "batch", 2: "sequence"}}, "fp32")
    # Traced with 4 new tokens after 3 cached ones, so no axis is specialized to 0 or 1.
    example = {"inputs_embeds": torch.randn(1, 4, h),
               "attention_mask": torch.ones(1, 7, dtype=torch.long),
               "position_ids": torch.arange(3, 7).expand(3, 1, 4).contiguous(),
               **({"deepstack_embeds": torch.randn(deep, 1, 4, h)} if deep else {}),
               **{n: torch.randn(1, kv, 3, d) for n in layout.past_names}}
    names = vlm_graphs.decoder_names(layout)[1]
    vlm_graphs.write_onnx(decoder, example, paths[DECODER], names,
                          vlm_graphs.decoder_dynamic_axes(layout), "fp32")

    parity = {}
    with torch.inference_mode():
        embedded = embed(*embed_feeds.values())
        embedded = embedded if isinstance(embedded, tuple) else (embedded,)
        positions = rope_positions(ids, layout)[0]
        prefill = {"inputs_embeds": embedded[0], "attention_mask": torch.ones_like(torch_ids),
                   "position_ids": torch.from_numpy(positions),
                   **({"deepstack_embeds": embedded[1]} if deep else {}),
                   **{n: torch.zeros(1, kv, 0, d) for n in layout.past_names}}
        checks = {VISION: (vision, {"pixel_values": torch_patches[1]}, visual_names),
                  EMBED: (embed, embed_feeds, embed_names),
                  DECODER: (decoder, prefill, names)}
        for graph, (module, feeds, outputs) in checks.items():
            reference = module(*feeds.values())
            reference = reference if isinstance(reference, tuple) else (reference,)
            expected = {n: r.numpy() for n, r in zip(outputs, reference, strict=True)}
            with registry.open_engine(paths[graph], "onnxruntime", precision="fp32") as engine:
                got = engine.run({n: t.numpy() for n, t in feeds.items()})
            parity[graph] = compare(expected, got, "fp32")
            require_parity(parity[graph], str(paths[graph]))
            parity[graph]["reference"] = f"torch {torch.__version__} eager fp32 on cpu"
    for size, sample in bucket_samples(layout).items():  # the aspect buckets' vision graphs
        graph = layout.vision_graph(size)
        module = vlm_graphs.VisionGraph(model, layout.grid_for(size), deepstack=bool(deep))
        vlm_graphs.write_onnx(module, {"pixel_values": torch.from_numpy(sample)}, paths[graph],
                              visual_names, {}, "fp32")
        with torch.inference_mode():
            reference = module(torch.from_numpy(sample))
        reference = reference if isinstance(reference, tuple) else (reference,)
        with registry.open_engine(paths[graph], "onnxruntime", precision="fp32") as engine:
            got = engine.run({"pixel_values": sample})
        parity[graph] = compare({n: r.numpy() for n, r in zip(visual_names, reference,
                                                                strict=True)}, got, "fp32")
        require_parity(parity[graph], str(paths[graph]))
        parity[graph]["reference"] = f"torch {torch.__version__} eager fp32 on cpu"
    return paths, parity


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


def end_to_end(model, hf, out: Path, layout: VlmLayout, ids: np.ndarray,
                patches: list[np.ndarray], new_tokens: int) -> dict[str, object]:
    """Prefill logits and greedy tokens through the fp32 bundle vs transformers."""
    prompt = ids.shape[1]
    reference_logits, generated = vlm_verify.transformers_greedy(model, hf, new_tokens)
    with load_bundle(out, config=EngineConfig(precision="fp32")) as bundle:
        tokens, logits = vlm_verify.greedy(bundle, layout, ids, patches, new_tokens,
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
    result["_logits"] = logits
    return result


def quantize_graphs(model, out: Path, layout: VlmLayout, chosen: dict[str, str],
                    paths: dict[str, Path], ids: np.ndarray, patches: list[np.ndarray],
                    block_size: int, quantize_lm_head: bool,
                    int8_method: str = "weight-only") -> dict[str, tuple[Path, dict]]:
    """Lower the graphs `chosen` names a non-fp32 precision for (int8/int4 quantized, fp16
    converted); gate the vision and embed graphs against eager on the prompt's images.

    int8 decoders take `int8_method`; int8 vision towers are quantized dynamically (they pass
    their gate so, and prefill-sized MatMuls run 2x faster that way than weight-only).

    Returns:
        graph -> (lowered file, parity record); the decoder's is completed by decoder_drift.
    """
    made: dict[str, tuple[Path, dict]] = {}
    deep = layout.deepstack_layers
    vision = vlm_graphs.VisionGraph(model, layout.grid_thw, deepstack=bool(deep))
    embed = vlm_graphs.EmbedGraph(model, layout.image_token_id)
    visual_names = ["image_features", "deepstack_features"][:2 if deep else 1]
    with torch.inference_mode():
        visual = _concat_visual([vision(torch.from_numpy(p)) for p in patches], deep)
        embed_feeds = {"input_ids": ids,
                       **{n: v.numpy() for n, v in zip(visual_names, visual, strict=True)}}
        embedded = embed(*(torch.from_numpy(v) for v in embed_feeds.values()))
        embedded = embedded if isinstance(embedded, tuple) else (embedded,)
        one = vision(torch.from_numpy(patches[1]))
        one = one if isinstance(one, tuple) else (one,)
    checks = {VISION: ({"pixel_values": patches[1]},
                       {n: t.numpy() for n, t in zip(visual_names, one, strict=True)}),
              EMBED: (embed_feeds, {n: t.numpy() for n, t in zip(
                  ["inputs_embeds", "deepstack_embeds"], embedded, strict=False)})}
    for size, sample in bucket_samples(layout).items():
        module = vlm_graphs.VisionGraph(model, layout.grid_for(size), deepstack=bool(deep))
        with torch.inference_mode():
            bucket = module(torch.from_numpy(sample))
        bucket = bucket if isinstance(bucket, tuple) else (bucket,)
        checks[layout.vision_graph(size)] = (
            {"pixel_values": sample},
            {n: t.numpy() for n, t in zip(visual_names, bucket, strict=True)})
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
        if graph in checks:
            feeds, expected = checks[graph]
            with registry.open_engine(target, "onnxruntime", precision=precision) as engine:
                got = engine.run(cast_feeds(feeds, {s.name: s.dtype for s in engine.inputs}))
            tolerance = VLM_GRAPH_TOLERANCES[precision]
            parity.update(compare(expected, got, precision, tolerance))
            parity["gate"] = f"cosine of every output >= {tolerance.min_cosine}"
            parity["verified_on"] = VERIFIED_ON
            if not parity["passed"]:
                raise ParityError(f"{target}: outside its gate {parity['gate']}: {parity}")
        made[graph] = (target, parity)
    return made


def decoder_drift(out: Path, layout: VlmLayout, precision: str, ids: np.ndarray,
                  patches: list[np.ndarray], fp32: dict[str, object]) -> dict[str, object]:
    """Logit cosine and top-1 agreement of the bundle's preferred (quantized) graphs with the
    fp32 ones, teacher-forced along the fp32 greedy tokens; int8 is gated (verify.py)."""
    tokens = fp32["tokens"]
    with load_bundle(out) as bundle:
        logits = vlm_verify.forced_logits(bundle, layout, ids, patches, tokens)
        vision = bundle.entry(VISION).precision
        method = (bundle.entry(DECODER).parity or {}).get("quantization", {}).get("method")
    reference = fp32["_logits"]
    cosines = [vlm_verify.cosine(a, b) for a, b in zip(logits, reference, strict=True)]
    top1 = [int(np.argmax(a) == np.argmax(b)) for a, b in zip(logits, reference, strict=True)]
    gate = VLM_MIN_LOGIT_COSINE[precision]
    drift = {"prefill_logits_cosine": cosines[0], "min_logits_cosine": min(cosines),
             "prefill_logits_max_abs": float(np.max(np.abs(logits[0] - reference[0]))),
             "top1_agreement": float(np.mean(top1)), "positions": len(top1),
             "reference": "fp32 graphs, teacher-forced along their greedy tokens; this "
                          f"bundle as loaded (vision {vision})",
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
