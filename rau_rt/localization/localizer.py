"""`Localizer`: boxes for named reference regions in a frame, from the bundle's VLM.

Construction does everything the reference allows once: the vision features of the reference
and of its annotated rendering, and the decoder's KV cache over the whole reference prefix of
the prompt (rau_rt.localization.prompts), plus llguidance's tokenizer for constrained answers.
A query then encodes only the target frame and prefills only the tail of the prompt on top of
the cached prefix, and decodes greedily under the answer grammar.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rau_rt import ops
from rau_rt.errors import BundleError, InputError
from rau_rt.localization import prompts
from rau_rt.localization.constrained import (
    ANSWER_FORMS,
    Guidance,
    box_grammar,
    max_answer_bytes,
)
from rau_rt.localization.parse import parse_answer
from rau_rt.reference import Reference
from rau_rt.types import Box, Frame
from rau_rt.vlm_decoding import Decoder, GraphRunner, ImageFeatures, KvCache
from rau_rt.vlm_layout import (
    VlmLayout,
    patchify,
    read_layout,
)

# Token bound of free (unconstrained) answers and of `ask`: a box item is ~25 tokens with
# Qwen's vocabulary, so 256 holds ten regions.
FREE_MAX_TOKENS = 256
TIMING_STAGES = ("preprocess", "vision", "prefill", "decode", "parse")


class _FamilySystem:
    """The type of FAMILY_SYSTEM."""

    def __repr__(self) -> str:
        return "FAMILY_SYSTEM"


# LocalizerConfig.system's default: the VLM family's own default system turn
FAMILY_SYSTEM = _FamilySystem()


@dataclass(frozen=True)
class LocalizerConfig:
    """Localizer settings.

    Attributes:
        constrained: decode under the answer grammar (llguidance); every answer parses.
        prefix_cache: reuse the reference prefix's KV cache and image features (off: every
            query runs the whole prompt, for comparison and benchmarks).
        max_new_tokens: token bound of `locate`; None: the grammar's longest answer in bytes
            when constrained (so an answer always completes), FREE_MAX_TOKENS otherwise.
        ask_max_new_tokens: token bound of `ask`.
        system: the system prompt; FAMILY_SYSTEM (default): what the family's chat template
            inserts when a conversation has none, as the model was fine-tuned with it
            (Qwen2/2.5-VL "You are a helpful assistant.", Qwen3-VL none); None: no system turn.
        channel_order: of bare (H, W, 3) arrays passed as frames ("rgb" or "bgr"); a `Frame`
            carries its own.
        answer_form: what the constrained grammar accepts (`constrained.ANSWER_FORMS`):
            "every" region asked once, in order, null where not visible (what the prompt
            asks for); "any": up to as many items as regions asked, any labels and order (a
            fine-tune that lists only what it finds).
    """

    constrained: bool = True
    prefix_cache: bool = True
    max_new_tokens: int | None = None
    ask_max_new_tokens: int = FREE_MAX_TOKENS
    system: str | _FamilySystem | None = FAMILY_SYSTEM
    channel_order: str = "rgb"
    answer_form: str = "every"

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1 or None, got {self.max_new_tokens}")
        if self.ask_max_new_tokens < 1:
            raise InputError(f"ask_max_new_tokens must be >= 1, got {self.ask_max_new_tokens}")
        if self.channel_order not in ("rgb", "bgr"):
            raise InputError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")
        if self.answer_form not in ANSWER_FORMS:
            raise InputError(f"answer_form must be one of {ANSWER_FORMS}, got "
                             f"{self.answer_form!r}")


@dataclass(frozen=True)
class LocateResult:
    """One `locate` query.

    Attributes:
        boxes: requested region -> box in frame pixels (x2/y2 exclusive), None if not found.
        reasons: region -> why its box is None (only for those).
        text: the answer as decoded.
        frame_size: (height, width) of the frame.
        prompt_tokens: tokens prefilled by this query (the tail only with the prefix cache).
        generated_tokens: answer tokens.
        stop_reason: "grammar", "eos" or "max_tokens".
        cached: whether the reference prefix cache was used.
        timings_ms: per stage (TIMING_STAGES) and "total".
    """

    boxes: Mapping[str, Box | None]
    reasons: Mapping[str, str]
    text: str
    frame_size: tuple[int, int]
    prompt_tokens: int
    generated_tokens: int
    stop_reason: str
    cached: bool
    timings_ms: Mapping[str, float]


def image_patches(image: np.ndarray, layout: VlmLayout, channel_order: str = "rgb",
                  bits_stored: int | None = None,
                  window: tuple[float, float] | None = None) -> np.ndarray:
    """An image as the vision graph's input: VOI-windowed if `window`, resized to its
    model-input size (`layout.size_for`: the input size, or the aspect bucket nearest the
    image's), normalized, patchified (what the localizer feeds for every image)."""
    fam = layout.family_constants
    size = layout.size_for(image.shape[:2])
    pixels = ops.resize_for_vlm(image, size=size, factor=fam.factor,
                                channel_order=channel_order, mean=fam.mean, std=fam.std,
                                window=window, bits_stored=bits_stored).pixels
    return patchify(pixels, fam)[0]


class Localizer:
    """Reference-guided localization with the VLM graphs of a loaded bundle.

    Args:
        bundle: a loaded VLM bundle (`rau_rt.bundle.load_bundle`); the caller closes it.
        reference: the annotated reference image.
        config: settings.
        layout, tokenizer_json: the bundle's vlm.json and tokenizer.json; read from
            `bundle.directory` when None.
        annotated: the reference's annotated rendering (`prompts.annotated_image`) when it
            was drawn elsewhere: a central server takes the tower's, because OpenCV 4 and 5
            draw text differently and the server's environment has OpenCV 4.
    """

    def __init__(self, bundle: GraphRunner, reference: Reference,
                 config: LocalizerConfig = LocalizerConfig(), *,
                 layout: VlmLayout | None = None, tokenizer_json: str | None = None,
                 annotated: np.ndarray | None = None) -> None:
        from tokenizers import Tokenizer

        directory = Path(getattr(bundle, "directory", "."))
        self.layout = layout if layout is not None else read_layout(directory)
        if tokenizer_json is None:
            tokenizer_json = (directory / "tokenizer.json").read_text()
        self.reference = reference
        self.config = config
        # the system turn the prompts carry (config.system resolved against the family)
        self.system = (self.layout.family_constants.default_system
                       if isinstance(config.system, _FamilySystem) else config.system)
        try:
            self._tokenizer = Tokenizer.from_str(tokenizer_json)
            self._guidance = (Guidance(tokenizer_json, self.layout.vocab_size,
                                       self.layout.eos_token_ids) if config.constrained else None)
        except Exception as exc:  # tokenizers and llguidance raise their own (Rust) errors
            raise BundleError(f"{directory / 'tokenizer.json'}: not a tokenizer the VLM's "
                              f"tokenizers/llguidance can read ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); re-export the VLM bundle") from None
        self._decoder = Decoder(bundle, self.layout)
        self._family = self.layout.family_constants
        self._grammars: dict[tuple[tuple[str, ...], int], tuple[str, int]] = {}
        self._prefix_parts = prompts.reference_parts(reference, self.layout)
        prefix = prompts.PromptParts(self._prefix_parts, (), self.system)
        # the reference and its annotated copy go to the vision graph of the reference's aspect
        self._reference_sizes = (self.layout.size_for(reference.size),) * 2
        self._prefix_ids = self._ids(prefix.prefix_text(), self._reference_sizes)
        if annotated is None:
            annotated = prompts.annotated_image(reference)
        elif (not isinstance(annotated, np.ndarray) or annotated.dtype != np.uint8
              or annotated.shape != (*reference.size, 3)):
            raise InputError(f"annotated: expected a uint8 {(*reference.size, 3)} RGB image of "
                             f"the reference, got {getattr(annotated, 'dtype', annotated)} "
                             f"{getattr(annotated, 'shape', '')}")
        self._annotated = annotated
        self._prefix_cache: KvCache | None = None
        self._cancel = threading.Event()
        self._query_thread: int | None = None  # the thread of the latest query
        if config.prefix_cache:
            self._prefix_cache = self._decoder.prefill(
                self._prefix_ids, self._reference_features())[1]

    @property
    def prefix_tokens(self) -> int:
        """Tokens of the reference prefix (cached once with `prefix_cache`)."""
        return int(self._prefix_ids.shape[1])

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes of the cached reference prefix's KV (0 without `prefix_cache`)."""
        cache = self._prefix_cache
        return 0 if cache is None else sum(int(a.nbytes) for a in cache.past.values())

    def locate(self, frame: Frame | np.ndarray,
               regions: Sequence[str] | None = None) -> dict[str, Box | None]:
        """Region name -> box in frame pixels, or None where the region was not found.

        Args:
            frame: a `Frame`, or a uint8/uint16 (H, W) or (H, W, 3) array in
                `config.channel_order`.
            regions: names annotated on the reference (default: all of them).
        """
        return dict(self.locate_result(frame, regions).boxes)

    def locate_result(self, frame: Frame | np.ndarray,
                      regions: Sequence[str] | None = None) -> LocateResult:
        """`locate` with the reasons, the answer text, token counts and timings."""
        names = tuple(regions) if regions is not None else self.reference.region_names
        started = time.perf_counter()
        self._cancel = threading.Event()  # this query's: `cancel` stops it, not the next one
        self._query_thread = threading.get_ident()
        parts = prompts.locate_parts(self.reference, self.layout, names, self.system)
        constraint, bound = None, self.config.max_new_tokens or FREE_MAX_TOKENS
        image, frame_size, times = self._frame_image(frame)
        size = self.layout.size_for(frame_size)
        if self._guidance is not None:
            compiled, grammar_bound = self._grammar(names, size)
            constraint = self._guidance.matcher(compiled)
            bound = self.config.max_new_tokens or grammar_bound
        generation, times = self._generate(parts, image, size, bound, constraint, times)
        text = self._tokenizer.decode(list(generation.tokens), skip_special_tokens=False)
        parse_start = time.perf_counter()
        parsed = parse_answer(text, names, self._family.box_convention, size, frame_size)
        times["parse"] = (time.perf_counter() - parse_start) * 1e3
        times["total"] = (time.perf_counter() - started) * 1e3
        return LocateResult(
            boxes={n: p.box for n, p in parsed.items()},
            reasons={n: p.reason for n, p in parsed.items() if p.reason is not None},
            text=text, frame_size=frame_size, prompt_tokens=generation.prompt_tokens,
            generated_tokens=len(generation.tokens), stop_reason=generation.stop_reason,
            cached=self._prefix_cache is not None, timings_ms=times)

    def cancel(self) -> None:
        """Stop the running query (from another thread: the worker calls it when the query
        outlives its timeout). The decode loop stops at its next step (`stop_reason`
        "cancelled"), and an engine call in flight on the query's thread is terminated where
        the backend can (ONNX Runtime, between nodes: the query raises EngineTerminatedError);
        the caller discards the query's answer either way."""
        self._cancel.set()
        terminate = getattr(self._decoder.graphs, "terminate", None)
        if terminate is not None and self._query_thread is not None:
            terminate(self._query_thread)

    def ask(self, frame: Frame | np.ndarray, question: str) -> str:
        """A free answer to a question about the frame (which region is this, where is X
        relative to Y), with the same reference prefix; greedy, unconstrained."""
        parts = prompts.ask_parts(self.reference, self.layout, question, self.system)
        image, frame_size, times = self._frame_image(frame)
        generation, _ = self._generate(parts, image, self.layout.size_for(frame_size),
                                       self.config.ask_max_new_tokens, None, times)
        return self._tokenizer.decode(list(generation.tokens), skip_special_tokens=True)

    def _grammar(self, names: tuple[str, ...], size: tuple[int, int]) -> tuple[str, int]:
        """The compiled answer grammar and its token bound for `names` on a target of
        model-input `size` (absolute coordinates are bounded by its longer side)."""
        limit = max(size) if self._family.box_convention == "absolute" else 1000
        if (names, limit) not in self._grammars:
            grammar = box_grammar(names, limit, self.config.answer_form)
            self._grammars[names, limit] = (self._guidance.compile(grammar),
                                            max_answer_bytes(names, limit))
        return self._grammars[names, limit]

    def prompt_ids(self, parts: prompts.PromptParts,
                   target_size: tuple[int, int] | None = None) -> np.ndarray:
        """[1, S] ids of a whole conversation (prefix + tail), image pads expanded; the
        target at the layout's input size unless `target_size` (its model-input size)."""
        target = self.layout.input_size if target_size is None else target_size
        return prompts.conversation_ids(self._tokenizer, parts, self.layout,
                                        [*self._reference_sizes, target])

    def patches(self, image: np.ndarray, channel_order: str = "rgb",
                bits_stored: int | None = None,
                window: tuple[float, float] | None = None) -> np.ndarray:
        """`image_patches` for this bundle."""
        return image_patches(image, self.layout, channel_order, bits_stored, window)

    def _ids(self, text: str, sizes: Sequence[Sequence[int]]) -> np.ndarray:
        return prompts.token_ids(self._tokenizer, text, self.layout, sizes)

    def _reference_features(self) -> ImageFeatures:
        ref = self.reference
        patches = [self.patches(ref.image, ref.channel_order),
                   self.patches(self._annotated, "rgb")]
        return self._decoder.image_features(patches, self._reference_sizes)

    def _frame_image(self, frame: Frame | np.ndarray,
                     ) -> tuple[np.ndarray, tuple[int, int], dict[str, float]]:
        start = time.perf_counter()
        if isinstance(frame, Frame):
            order = "rgb" if frame.channel_order == "gray" else frame.channel_order
            patches = self.patches(frame.image, order, frame.bits_stored, frame.window)
            size = frame.image.shape[:2]
        elif isinstance(frame, np.ndarray):
            patches = self.patches(frame, self.config.channel_order)
            size = frame.shape[:2]
        else:
            raise InputError(f"frame: expected a Frame or an image array, got "
                             f"{type(frame).__name__}")
        return patches, (int(size[0]), int(size[1])), {
            "preprocess": (time.perf_counter() - start) * 1e3}

    def _generate(self, parts: prompts.PromptParts, patches: np.ndarray,
                  size: tuple[int, int], bound: int, constraint, times: dict[str, float]):
        start = time.perf_counter()
        target = self._decoder.image_features([patches], [size])
        tail_ids = self._ids(parts.tail_text(), [size])
        if self._prefix_cache is not None:
            ids, features, cache = tail_ids, target, self._prefix_cache
        else:  # what a runtime without the reference cache does for every query
            ids = np.concatenate([self._prefix_ids, tail_ids], axis=1)
            features = ImageFeatures.concat([self._reference_features(), target])
            cache = None
        times["vision"] = (time.perf_counter() - start) * 1e3
        generation = self._decoder.generate(ids, features, cache, max_new_tokens=bound,
                                            constraint=constraint, cancel=self._cancel)
        times["prefill"] = generation.prefill_ms
        times["decode"] = generation.decode_ms
        return generation, times
