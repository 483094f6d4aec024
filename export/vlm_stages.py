"""The verified stages of `rau-rt export vlm` (rau_rt.export.vlm runs them in order).

`export_fp32` writes the three graphs and compares each with its eager module; `end_to_end`
runs the fp32 bundle like the runtime does and compares with transformers; `quantize_graphs`
and `decoder_drift` make the int8/int4 graphs and measure them against the fp32 ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rau_rt.bundle import load_bundle
from rau_rt.config import EngineConfig
from rau_rt.engines import registry
from rau_rt.export import vlm_graphs, vlm_verify
from rau_rt.export.quantize_vlm import QuantizeConfig, quantize
from rau_rt.export.verify import (
    VLM_GREEDY_EXACT,
    VLM_MIN_LOGIT_COSINE,
    VLM_PREFILL_LOGITS_ATOL,
    ParityError,
    compare,
    require_parity,
)
from rau_rt.vlm_layout import DECODER, EMBED, VISION, VlmLayout, rope_positions


def export_fp32(model, layout: VlmLayout, out: Path, ids: np.ndarray,
                 patches: list[np.ndarray]) -> tuple[dict[str, Path], dict[str, dict]]:
    """Write the three fp32 graphs and compare each with its eager module on the prompt."""
    paths = {g: out / f"{g}.fp32.onnx" for g in (VISION, EMBED, DECODER)}
    vision = vlm_graphs.VisionGraph(model, layout.grid_thw)
    embed = vlm_graphs.EmbedGraph(model, layout.image_token_id)
    decoder = vlm_graphs.DecoderGraph(model, layout.has_hidden_state)
    h, kv, d = layout.hidden_size, layout.num_kv_heads, layout.head_dim
    torch_patches = [torch.from_numpy(p) for p in patches]
    vlm_graphs.write_onnx(vision, {"pixel_values": torch_patches[0]}, paths[VISION],
                          ["image_features"], {}, "fp32")
    with torch.inference_mode():
        features = torch.cat([vision(p) for p in torch_patches])
    torch_ids = torch.from_numpy(ids)
    vlm_graphs.write_onnx(embed, {"input_ids": torch_ids, "image_features": features},
                          paths[EMBED], ["inputs_embeds"],
                          {"input_ids": {0: "batch", 1: "sequence"},
                           "image_features": {0: "image_tokens"},
                           "inputs_embeds": {0: "batch", 1: "sequence"}}, "fp32")
    # Traced with 4 new tokens after 3 cached ones, so no axis is specialized to 0 or 1.
    example = {"inputs_embeds": torch.randn(1, 4, h),
               "attention_mask": torch.ones(1, 7, dtype=torch.long),
               "position_ids": torch.arange(3, 7).expand(3, 1, 4).contiguous(),
               **{n: torch.randn(1, kv, 3, d) for n in layout.past_names}}
    names = vlm_graphs.decoder_names(layout)[1]
    vlm_graphs.write_onnx(decoder, example, paths[DECODER], names,
                          vlm_graphs.decoder_dynamic_axes(layout), "fp32")

    parity = {}
    with torch.inference_mode():
        embeds = embed(torch_ids, features)
        positions = rope_positions(ids, layout)[0]
        prefill = {"inputs_embeds": embeds, "attention_mask": torch.ones_like(torch_ids),
                   "position_ids": torch.from_numpy(positions),
                   **{n: torch.zeros(1, kv, 0, d) for n in layout.past_names}}
        checks = {VISION: (vision, {"pixel_values": torch_patches[1]}, ["image_features"]),
                  EMBED: (embed, {"input_ids": torch_ids, "image_features": features},
                          ["inputs_embeds"]),
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
    return paths, parity


def _agreement(tokens: list[int], reference: list[int]) -> float:
    """Share of positions where two token sequences agree (the longer one's length counts)."""
    common = min(len(tokens), len(reference))
    same = sum(a == b for a, b in zip(tokens[:common], reference[:common], strict=True))
    return same / max(len(tokens), len(reference), 1)


def end_to_end(model, hf, out: Path, layout: VlmLayout, ids: np.ndarray,
                patches: list[np.ndarray], new_tokens: int) -> dict[str, object]:
    """Prefill logits and greedy tokens through the fp32 bundle vs transformers."""
    prompt = ids.shape[1]
    with torch.inference_mode():
        reference_logits = model(**hf).logits[0, -1].numpy()
        generated = model.generate(**hf, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False)[0, prompt:].tolist()
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
                    paths: dict[str, Path], patches: list[np.ndarray], block_size: int,
                    quantize_lm_head: bool) -> dict[str, tuple[Path, dict]]:
    """Quantize the graphs `chosen` names a non-fp32 precision for; gate the vision tower.

    Returns:
        graph -> (quantized file, parity record); the decoder's is completed by decoder_drift.
    """
    made: dict[str, tuple[Path, dict]] = {}
    vision = vlm_graphs.VisionGraph(model, layout.grid_thw)
    for graph in (VISION, DECODER):
        precision = chosen[graph]
        if precision == "fp32":
            continue
        target = out / f"{graph}.{precision}.onnx"
        config = QuantizeConfig(precision, block_size=block_size,
                                quantize_lm_head=quantize_lm_head)
        quantize(paths[graph], target, config,
                 vocab_size=layout.vocab_size if graph == DECODER else None)
        parity: dict[str, object] = {"precision": precision, "quantization": config.__dict__,
                                     "reference_graph": paths[graph].name}
        if graph == VISION:
            with torch.inference_mode():
                expected = {"image_features": vision(torch.from_numpy(patches[1])).numpy()}
            with registry.open_engine(target, "onnxruntime", precision=precision) as engine:
                parity.update(compare(expected, engine.run({"pixel_values": patches[1]}),
                                      "int8"))
            gate = VLM_MIN_LOGIT_COSINE["int8"]
            parity["gate"] = f"image_features cosine >= {gate}"
            parity["passed"] = parity["outputs"]["image_features"]["cosine"] >= gate
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
        _, logits = vlm_verify.greedy(bundle, layout, ids, patches, len(tokens),
                                      min_new_tokens=len(tokens), forced=tokens)
        vision = bundle.entry(VISION).precision
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
             "passed": gate is None or cosines[0] >= gate}
    if not drift["passed"]:
        raise ParityError(f"{out}: the {precision} decoder is outside its gate "
                          f"{drift['gate']}: {drift}")
    return drift
