"""End-to-end checks of an exported VLM bundle against transformers, on one two-image prompt.

The runtime's side is numpy only and is the runtime's own code (rau_rt.ops, rau_rt.vlm_layout,
the decode loop of rau_rt.vlm_decoding over the bundle's engines): preprocessing, prompt ids,
greedy decoding with the KV cache fed back. The reference side is transformers' processor,
forward and `generate` on the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rau_rt import ops
from rau_rt.bundle import Bundle
from rau_rt.vlm_decoding import Decoder
from rau_rt.vlm_layout import (
    IMAGE_PLACEHOLDER,
    VlmFamily,
    VlmLayout,
    chat_prompt,
    expand_image_tokens,
    patchify,
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
              parts: Sequence[str] = PROMPT_PARTS, max_pixels: int | None = None):
    """transformers' processor output (torch tensors) for a one-turn conversation of `parts`
    (text, or IMAGE_PLACEHOLDER for the next of `images`); by default the export's prompt.
    `max_pixels`: the processor's pixel budget (default the family's, which leaves images at
    a model-input size as they are)."""
    import transformers
    from PIL import Image

    budget = {} if max_pixels is None else {"size": {"shortest_edge": fam.factor ** 2,
                                                     "longest_edge": max_pixels}}
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=fam.patch_size, merge_size=fam.merge_size,
        temporal_patch_size=fam.temporal_patch_size, image_mean=list(fam.mean),
        image_std=list(fam.std), **budget)
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


def transformers_reference(model, hf, new_tokens: int,
                           ) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """transformers' reference on `hf_inputs`: (last prefill logits [vocab], the `new_tokens`
    greedy tokens of `generate`, end-of-sequence suppressed until then, and the logits [vocab]
    each token was picked from, before any logits processor)."""
    import torch

    prompt = hf["input_ids"].shape[1]
    with torch.inference_mode():
        logits = model(**hf).logits[0, -1].float().numpy()
        out = model.generate(**hf, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    return (logits, out.sequences[0, prompt:].tolist(),
            [step[0].float().numpy() for step in out.logits])


def transformers_greedy(model, hf, new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """(last prefill logits, greedy tokens) of `transformers_reference`."""
    logits, tokens, _ = transformers_reference(model, hf, new_tokens)
    return logits, tokens


def greedy(bundle: Bundle, layout: VlmLayout, input_ids: np.ndarray,
           patches: Sequence[np.ndarray], new_tokens: int, min_new_tokens: int = 0,
           ) -> tuple[list[int], list[np.ndarray]]:
    """The runtime's greedy loop (`rau_rt.vlm_decoding.Decoder.generate`, what the localizer
    runs) through the bundle's graphs.

    Args:
        input_ids: [1, S] prompt ids (image pads expanded).
        patches: each image's vision-graph input, in prompt order.
        new_tokens: tokens to generate at most (stops before an end-of-sequence token).
        min_new_tokens: end-of-sequence tokens are masked before this many, as `generate` does.

    Returns:
        (the generated tokens, the logits [vocab] each was picked from).
    """
    decoder = Decoder(bundle, layout)
    answer = decoder.generate(input_ids, decoder.image_features(patches),
                              max_new_tokens=new_tokens, min_new_tokens=min_new_tokens,
                              keep_logits=True)
    return list(answer.tokens), list(answer.logits)


def forced_logits(bundle: Bundle, layout: VlmLayout, input_ids: np.ndarray,
                  patches: Sequence[np.ndarray], tokens: Sequence[int]) -> list[np.ndarray]:
    """Teacher forcing through the runtime's decoder: the logits [vocab] before each of
    `tokens`, fed one by one along that path (to compare two bundles' next-token choices on
    the same path)."""
    decoder = Decoder(bundle, layout)
    logits, cache = decoder.prefill(input_ids, decoder.image_features(patches))
    seen = [logits.copy()]
    for token in tokens[:-1]:
        logits, cache = decoder.step([int(token)], cache)
        seen.append(logits.copy())
    return seen


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / max(np.linalg.norm(a64) * np.linalg.norm(b64), 1e-300))
