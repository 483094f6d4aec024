"""End-to-end checks of an exported VLM bundle against transformers, on one two-image prompt.

The runtime's side is numpy only (rau_rt.ops, rau_rt.vlm_layout, the bundle's
engines): preprocessing, prompt ids, a greedy loop with the KV cache fed back. The reference
side is transformers' processor, forward and `generate` on the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rau_rt import ops
from rau_rt.bundle import Bundle
from rau_rt.vlm_layout import (
    DECODER,
    EMBED,
    IMAGE_PLACEHOLDER,
    VISION,
    VlmFamily,
    VlmLayout,
    cast_feeds,
    chat_prompt,
    declared_dtypes,
    decode_positions,
    expand_image_tokens,
    patchify,
    rope_positions,
)

# RAU's prompt shape: reference image, its description, target image, the question.
PROMPT_PARTS = (IMAGE_PLACEHOLDER, "The first image is the reference with the annotated regions.",
                IMAGE_PLACEHOLDER, "Locate the same regions in the second image. Answer in JSON.")


def sample_images(size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Two RGB uint8 images at the model-input size: smooth gradients plus noise, so that
    resizing is the identity and the patches compare without resampling differences."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
    images = []
    for k in range(2):
        base = np.stack([x / size[1], y / size[0], (x + y) / sum(size)], -1) * (180 + 40 * k)
        noise = rng.normal(0, 20, (*size, 3))
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images


def runtime_inputs(images: Sequence[np.ndarray], layout: VlmLayout, tokenizer_json: Path,
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(input ids [1, S], per-image patches) as the runtime makes them, without transformers."""
    from tokenizers import Tokenizer

    fam = layout.family_constants
    patches = [patchify(ops.resize_for_vlm(img, size=layout.input_size, channel_order="rgb",
                                           factor=fam.factor, mean=fam.mean,
                                           std=fam.std).pixels, fam)[0] for img in images]
    text = chat_prompt(PROMPT_PARTS, system=fam.default_system)
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids
    return expand_image_tokens(ids, layout)[None], patches


def hf_inputs(images: Sequence[np.ndarray], tokenizer, fam: VlmFamily,
              parts: Sequence[str] = PROMPT_PARTS):
    """transformers' processor output (torch tensors) for a one-turn conversation of `parts`
    (text, or IMAGE_PLACEHOLDER for the next of `images`); by default the export's prompt."""
    import transformers
    from PIL import Image

    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=fam.patch_size, merge_size=fam.merge_size,
        temporal_patch_size=fam.temporal_patch_size, image_mean=list(fam.mean),
        image_std=list(fam.std))
    processor_class, video_class = {
        "qwen2_5_vl": (transformers.Qwen2_5_VLProcessor, transformers.Qwen2VLVideoProcessor),
        "qwen2_vl": (transformers.Qwen2VLProcessor, transformers.Qwen2VLVideoProcessor),
        "qwen3_vl": (transformers.Qwen3VLProcessor, transformers.Qwen3VLVideoProcessor)}[fam.name]
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=video_class(),
                                chat_template=tokenizer.chat_template)
    content = [{"type": "image"} if part == IMAGE_PLACEHOLDER else {"type": "text", "text": part}
               for part in parts]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[Image.fromarray(img) for img in images],
                     return_tensors="pt")


def transformers_greedy(model, hf, new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """transformers' reference on `hf_inputs`: (last prefill logits [vocab], the `new_tokens`
    greedy tokens of `generate`, end-of-sequence suppressed until then)."""
    import torch

    prompt = hf["input_ids"].shape[1]
    with torch.inference_mode():
        logits = model(**hf).logits[0, -1].numpy()
        tokens = model.generate(**hf, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False)[0, prompt:].tolist()
    return logits, tokens


def image_features(bundle: Bundle, patches: Sequence[np.ndarray],
                   layout: VlmLayout) -> np.ndarray:
    """Every image through the vision graph, concatenated in prompt order ([0, hidden] for
    a text-only prompt)."""
    return visual_feeds(bundle, patches, layout)["image_features"]


def visual_feeds(bundle: Bundle, patches: Sequence[np.ndarray],
                 layout: VlmLayout) -> dict[str, np.ndarray]:
    """The embed graph's image inputs for these images: image_features [N, hidden] (and
    deepstack_features [L, N, hidden] with deepstack), concatenated in prompt order."""
    outputs = [run(bundle, VISION, {"pixel_values": p}) for p in patches]
    deep = layout.deepstack_layers
    hidden = layout.hidden_size
    feeds = {"image_features": (np.concatenate([o["image_features"] for o in outputs])
                                if outputs else np.zeros((0, hidden), np.float32))}
    if deep:
        feeds["deepstack_features"] = (
            np.concatenate([o["deepstack_features"] for o in outputs], axis=1)
            if outputs else np.zeros((deep, 0, hidden), np.float32))
    return feeds


def run(bundle: Bundle, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`bundle.run` with float feeds cast to the dtypes the loaded graph declares."""
    return bundle.run(graph, cast_feeds(feeds, declared_dtypes(bundle, graph)))


def greedy(bundle: Bundle, layout: VlmLayout, input_ids: np.ndarray,
           patches: Sequence[np.ndarray], new_tokens: int, min_new_tokens: int = 0,
           forced: Sequence[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding through the bundle's graphs with the KV cache fed back.

    Args:
        input_ids: [1, S] prompt ids (image pads expanded).
        patches: each image's vision-graph input, in prompt order.
        new_tokens: tokens to generate at most (stops after an end-of-sequence token).
        min_new_tokens: end-of-sequence tokens are masked before this many, as `generate` does.
        forced: teacher forcing: feed these tokens instead of the argmax (the returned tokens
            are still the argmax of each step), to compare next-token choices along one path.

    Returns:
        (the argmax token of every step, the logits [vocab] of every step).
    """
    embeds = run(bundle, EMBED, {"input_ids": input_ids,
                                 **visual_feeds(bundle, patches, layout)})
    no_images = visual_feeds(bundle, [], layout)
    positions, delta = rope_positions(input_ids, layout)
    length = input_ids.shape[1]
    kv_dtype = declared_dtypes(bundle, DECODER).get(layout.past_names[0], layout.float_dtype)
    feeds = {**embeds, "attention_mask": np.ones((1, length), np.int64),
             "position_ids": positions, **layout.empty_past(1, kv_dtype)}
    eos = list(layout.eos_token_ids)
    tokens: list[int] = []
    logits_seen: list[np.ndarray] = []
    steps = new_tokens if forced is None else len(forced)
    for step in range(steps):
        out = run(bundle, DECODER, feeds)
        logits = out["logits"][0].astype(np.float32)
        logits_seen.append(logits)
        masked = logits.copy()
        if step < min_new_tokens:
            masked[eos] = -np.inf
        token = int(np.argmax(masked))
        tokens.append(token)
        fed = token if forced is None else int(forced[step])
        if forced is None and token in eos:
            break
        embeds = run(bundle, EMBED, {"input_ids": np.array([[fed]], np.int64), **no_images})
        feeds = {**embeds, "attention_mask": np.ones((1, length + 1), np.int64),
                 "position_ids": decode_positions(length, delta),
                 **{p: out[q] for p, q in zip(layout.past_names, layout.present_names,
                                              strict=True)}}
        length += 1
    return tokens, logits_seen


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / max(np.linalg.norm(a64) * np.linalg.norm(b64), 1e-300))
