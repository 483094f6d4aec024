"""Greedy decoding over a VLM bundle's graphs with a KV cache and a reusable prefix cache.

The graphs (rau_rt.vlm_layout.VlmLayout documents their tensors): `vlm_vision` turns one
image's patches into image features, `vlm_embed` turns ids (+ image features at the image-pad
positions) into embeddings, `vlm_decoder` takes embeddings, 3-D M-RoPE positions and the past
KV and returns the last logits and the present KV. All state is numpy arrays owned here
(ARCHITECTURE.md rule 1), so a cached prefix is just a `KvCache` value: a query prefills only
its own tokens on top of it, its positions continuing after the prefix's (`rope_positions`
with `start` = the prefix's next position), and the prefix's arrays are never written to, so
any number of queries can share it.

This is rau-rt's one decode loop: the localizer answers with it, and `rau-rt export vlm`
verifies it against transformers' `generate` (rau_rt.export.vlm.verify), so the exporter checks
the code users run. It sits in the core layer, beside the contract it implements
(rau_rt.vlm_layout), because export may not import the domain layer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rau_rt.errors import DecodingError, InputError
from rau_rt.vlm_layout import (
    DECODER,
    EMBED,
    VlmLayout,
    cast_feeds,
    declared_dtypes,
    decode_positions,
    rope_positions,
)


class GraphRunner(Protocol):
    """What decoding needs of a loaded bundle (`rau_rt.bundle.Bundle` is one)."""

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Constraint(Protocol):
    """A token-level constraint (`rau_rt.localization.constrained.BoxConstraint` is one)."""

    def allowed(self) -> np.ndarray:
        """bool [vocab]: tokens allowed next."""
        ...

    def advance(self, token: int) -> None: ...

    def forced(self) -> list[int]:
        """Tokens the constraint forces next (possibly none), already advanced over."""
        ...

    def is_stopped(self) -> bool:
        """Whether the constrained text is complete (no token may follow)."""
        ...


@dataclass(frozen=True)
class ImageFeatures:
    """The vision graph's outputs for the images of a prompt, in prompt order.

    Attributes:
        features: [N, hidden] merged visual tokens, scattered at the image-pad positions.
        deepstack: [L, N, hidden] features of intermediate vision blocks (Qwen3-VL), added at
            the same positions after the decoder's first L layers; None without deepstack.
        grids: each image's merged (rows, cols), for its M-RoPE positions; empty: every image
            at the layout's input size.
    """

    features: np.ndarray
    deepstack: np.ndarray | None = None
    grids: tuple[tuple[int, int], ...] = ()

    @property
    def tokens(self) -> int:
        return int(self.features.shape[0])

    def feeds(self) -> dict[str, np.ndarray]:
        """The embed graph's image inputs."""
        feeds = {"image_features": self.features}
        if self.deepstack is not None:
            feeds["deepstack_features"] = self.deepstack
        return feeds

    @staticmethod
    def concat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        """Images of several parts of a prompt, joined in order (at least one part)."""
        deep = [p.deepstack for p in parts]
        if any(p.tokens and not p.grids for p in parts) and any(p.grids for p in parts):
            raise InputError("ImageFeatures.concat: parts with and without grids")
        return ImageFeatures(np.concatenate([p.features for p in parts]),
                             None if deep[0] is None else np.concatenate(deep, axis=1),
                             tuple(g for p in parts for g in p.grids))


@dataclass(frozen=True)
class KvCache:
    """The decoder's KV for the tokens processed so far.

    Attributes:
        past: one array per `layout.past_names` entry, [1, kv_heads, length, head_dim].
        length: tokens held.
        delta: M-RoPE's rope delta: the next token's position is `length + delta`.
    """

    past: Mapping[str, np.ndarray]
    length: int
    delta: int

    @property
    def next_position(self) -> int:
        return self.length + self.delta


@dataclass(frozen=True)
class Generation:
    """One greedy answer.

    Attributes:
        tokens: generated ids, the stop token excluded.
        stop_reason: "eos" (a stop id), "grammar" (the constraint completed), "max_tokens", or
            "cancelled" (the caller's `cancel` event was set: a query past its timeout).
        prompt_tokens: tokens prefilled for this answer (the tail only, on a cached prefix).
        prefill_ms: embedding + decoder over the prompt tokens.
        decode_ms: the token-by-token loop after it.
        logits: with `keep_logits`, the float32 [vocab] logits each chosen token was picked
            from (before any mask), in order; forced tokens have none. Empty otherwise.
    """

    tokens: tuple[int, ...]
    stop_reason: str
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float
    logits: tuple[np.ndarray, ...] = ()


class Decoder:
    """Greedy decoding through `vlm_vision`, `vlm_embed` and `vlm_decoder`.

    Args:
        graphs: a loaded bundle (or anything with `run(graph, feeds)`).
        layout: the bundle's vlm.json.
    """

    def __init__(self, graphs: GraphRunner, layout: VlmLayout) -> None:
        self.graphs = graphs
        self.layout = layout
        # Feeds are cast to the dtypes the loaded graphs declare (fp16 graphs take a float16
        # KV cache), so the cache is kept in the decoder's dtype from the start.
        self._dtypes = {g: declared_dtypes(graphs, g)
                        for g in (*layout.vision_graphs, EMBED, DECODER)}
        self._kv_dtype = self._dtypes[DECODER].get(layout.past_names[0], layout.float_dtype)
        hidden, deep = layout.hidden_size, layout.deepstack_layers
        self._no_images = ImageFeatures(np.zeros((0, hidden), np.float32),
                                        np.zeros((deep, 0, hidden), np.float32) if deep
                                        else None)

    def image_features(self, patches: Sequence[np.ndarray],
                       sizes: Sequence[Sequence[int]] | None = None) -> ImageFeatures:
        """Every image's patches through the vision graph of its model-input size (`sizes`,
        in order; None: all at the layout's input size), concatenated in prompt order."""
        if not patches:
            return self._no_images
        if sizes is None:
            sizes = [self.layout.input_size] * len(patches)
        if len(sizes) != len(patches):
            raise InputError(f"image_features: {len(patches)} images, {len(sizes)} sizes")
        parts = []
        for p, size in zip(patches, sizes, strict=True):
            out = self._run(self.layout.vision_graph(size), {"pixel_values": p})
            parts.append(ImageFeatures(out["image_features"], out.get("deepstack_features"),
                                       (self.layout.merged_grid(size),)))
        return ImageFeatures.concat(parts)

    def empty_cache(self) -> KvCache:
        """No tokens yet, in the decoder's KV dtype."""
        return KvCache(self.layout.empty_past(1, self._kv_dtype), 0, 0)

    def prefill(self, ids: np.ndarray, features: ImageFeatures, cache: KvCache | None = None,
                ) -> tuple[np.ndarray, KvCache]:
        """Run prompt ids on top of `cache` (None: from scratch).

        Deepstack rows (Qwen3-VL) reach the decoder with the prefill that holds their image
        tokens only; the cache then carries their effect, as in transformers' full forward.

        Args:
            ids: [1, S] ids with every image's pad tokens expanded.
            features: image features of the images in `ids`, in order (`image_features([])`
                for none).
            cache: the KV of the tokens before `ids`, e.g. a cached reference prefix.

        Returns:
            (logits [vocab] float32 of the last position, the cache after `ids`).
        """
        ids = np.asarray(ids, np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise InputError(f"prefill: expected ids of shape [1, S >= 1], got {ids.shape}")
        pads = int(np.count_nonzero(ids == self.layout.image_token_id))
        if pads != features.tokens:
            raise InputError(f"prefill: {pads} image-pad tokens in the ids but "
                             f"{features.tokens} image feature rows")
        if cache is None:
            cache = self.empty_cache()
        positions, delta = rope_positions(ids, self.layout, start=cache.next_position,
                                          grids=features.grids or None)
        embeds = self._run(EMBED, {"input_ids": ids, **features.feeds()})
        return self._decode(embeds, positions, cache, delta=cache.delta + delta)

    def generate(self, ids: np.ndarray, features: ImageFeatures, cache: KvCache | None = None, *,
                 max_new_tokens: int, min_new_tokens: int = 0,
                 stop_ids: Sequence[int] | None = None, constraint: Constraint | None = None,
                 cancel: threading.Event | None = None, keep_logits: bool = False,
                 ) -> Generation:
        """Greedy tokens after a prompt.

        Args:
            ids, features, cache: as `prefill`.
            max_new_tokens: bound on generated tokens (the stop token not counted).
            min_new_tokens: stop ids are masked until this many tokens stand, as transformers'
                `generate(min_new_tokens=...)` does (the exporter's comparison with it).
            stop_ids: ids that end the answer (default: the layout's end-of-turn ids).
            constraint: masks each step's logits to the tokens it allows and is advanced with
                the chosen token; tokens it forces (JSON keys, separators) are appended and fed
                to the decoder together in one call instead of one call each; the answer ends
                as soon as it reports stopped.
            cancel: checked before every decoder call; once set, the answer ends as it stands
                ("cancelled"), so a timed-out query frees its thread within one step.
            keep_logits: keep every step's logits in the answer (verification; copies a
                vocab-sized array per token).
        """
        if max_new_tokens < 1:
            raise InputError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise InputError(f"generate: min_new_tokens must be in 0..{max_new_tokens}, got "
                             f"{min_new_tokens}")
        stops = set(self.layout.eos_token_ids if stop_ids is None else stop_ids)
        banned = np.array(sorted(stops), np.int64)
        started = time.perf_counter()
        logits, cache = self.prefill(ids, features, cache)
        prefilled = time.perf_counter()
        tokens: list[int] = []
        seen: list[np.ndarray] = []
        reason = "max_tokens"
        while True:
            if keep_logits:
                seen.append(logits.copy())
            if len(tokens) < min_new_tokens and banned.size:
                logits = logits.copy()
                logits[banned[banned < logits.shape[0]]] = -np.inf
            token = self._choose(logits, constraint)
            if token in stops:
                reason = "eos"
                break
            feed = [token]
            if constraint is not None:
                constraint.advance(token)
                if not constraint.is_stopped():
                    feed += constraint.forced()
            room = max_new_tokens - len(tokens)
            tokens += feed[:room]
            if len(feed) > room:  # forced tokens past the bound: cut, as if generated singly
                break
            if constraint is not None and constraint.is_stopped():
                reason = "grammar"
                break
            if len(tokens) >= max_new_tokens:
                break
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            logits, cache = self.step(feed, cache)
        done = time.perf_counter()
        return Generation(tuple(tokens), reason, int(ids.shape[1]),
                          (prefilled - started) * 1e3, (done - prefilled) * 1e3, tuple(seen))

    def step(self, tokens: Sequence[int], cache: KvCache) -> tuple[np.ndarray, KvCache]:
        """One decoder call appending `tokens` (one sampled token plus any forced ones)."""
        embeds = self._run(EMBED, {"input_ids": np.array([list(tokens)], np.int64),
                                   **self._no_images.feeds()})
        positions = decode_positions(cache.length, cache.delta, steps=len(tokens))
        return self._decode(embeds, positions, cache, delta=cache.delta)

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.graphs.run(graph, cast_feeds(feeds, self._dtypes[graph]))

    def _decode(self, embeds: Mapping[str, np.ndarray], positions: np.ndarray, cache: KvCache,
                delta: int) -> tuple[np.ndarray, KvCache]:
        """The decoder over the embed graph's outputs (inputs_embeds [+ deepstack_embeds])."""
        new = embeds["inputs_embeds"].shape[1]
        layout = self.layout
        out = self._run(DECODER, {
            **embeds, "attention_mask": np.ones((1, cache.length + new), np.int64),
            "position_ids": positions, **cache.past})
        present = {p: out[q] for p, q in zip(layout.past_names, layout.present_names,
                                             strict=True)}
        return (out["logits"][0].astype(np.float32, copy=False),
                KvCache(present, cache.length + new, delta))

    @staticmethod
    def _choose(logits: np.ndarray, constraint: Constraint | None) -> int:
        if constraint is None:
            return int(np.argmax(logits))
        allowed = constraint.allowed()
        if allowed.shape != logits.shape:
            raise DecodingError(f"constraint mask has {allowed.shape[0]} entries, the logits "
                                f"{logits.shape[0]}; build the tokenizer with n_vocab = the "
                                "decoder's vocab size")
        if not allowed.any():
            raise DecodingError("the constraint allows no token")
        return int(np.argmax(np.where(allowed, logits, -np.inf)))
