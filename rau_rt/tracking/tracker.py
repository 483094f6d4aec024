"""The streaming SAM2 tracker: the four graphs of a bundle, frame by frame, all regions batched.

Per frame (notes/sam2_parity.md, section 2, is the specification):

1. `image_encoder` once for the frame.
2. Regions prompted on this frame (a VLM or user box) run as sam2 runs a box on a frame it has
   not tracked: no memory (`features_no_memory`), the box as two corner points, a single mask
   (token 0 unless its stability is under 0.98, then the best-IoU multimask token), the pointer
   of token 0; the mask enters memory binarized, after hole filling, as a conditioning frame.
3. Every other region with memory is tracked: `memory_attention` over the memory sam2 would
   gather (one batched call per distinct memory size: one in steady state), then the decoder
   with no prompt: the best-IoU of tokens 1-3 and that token's pointer; the mask enters
   memory as sigmoid x 20 - 10 of the unfilled logits, as a tracked frame. With the
   `memory_window` lever, a region tracked on the previous frame whose box fits conditions
   only a window of a quarter of the tokens around that box (`memory_attention_window`), keeps
   its previous frame's features elsewhere, and its mask is background outside the window.
4. One batched `memory_encoder` call over the regions that store a memory (all of them unless
   a profile's `memory_interval` skips tracked ones on this frame); post-processing (hole
   filling, upsampling to the frame, threshold, box, score).

Presence: sam2's object score decides; where it is <= 0 the decoder graph already set the mask to
-1024 and the pointer to `no_obj_ptr`, and the memory encoder adds the no-object embedding. An
absent region gets no mask and no box.

The annotated reference (`add_reference`, RAU's "SAM2 memory setup") enters as sam2's
`add_new_mask` does: the mask itself is the output (logits +-10, antialiased to S/4), the pointer
comes from the decoder run on the raw features with the mask as its prompt, and the memory is
encoded from the binarized mask. It becomes a pinned conditioning frame one frame before the
frame it was added at, as if it were the previous frame of sam2's clip.

State only changes after every graph of a frame ran, so a bad frame (InputError) or an engine
error leaves the tracker as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from rau_rt import ops
from rau_rt.errors import InputError, NumericsError
from rau_rt.reference import pool_features
from rau_rt.sam2_layout import (
    MAX_REGIONS,
    MEMORY_POOL,
    POOLED_MEMORY_ATTENTION,
    WINDOWED_MEMORY_ATTENTION,
    Sam2Layout,
    read_layout,
    window_index,
    window_side,
)
from rau_rt.tracking.memory import MemoryBank, MemoryConfig
from rau_rt.types import Frame, RegionResult

log = logging.getLogger(__name__)

STAGES = ("preprocess", "image_encoder", "memory_attention", "mask_decoder", "memory_encoder",
          "postprocess")
# sam2's `_use_mask_as_output`: a mask prompt becomes logits +-10 (sigmoid(-10) = 4.5e-5) and
# object score +10.
MASK_LOGIT = 10.0
PROMPT_SOURCES = ("vlm", "user")
# Tracking profiles: a value per lever of `LEVERS`. "exact" is sam2's video predictor (6
# memories, 15 pointers, a memory every frame, memory tokens not pooled, every token
# conditioned). "fast" attends the 2 newest tracked memories, stores one every second frame
# (the memory encoder skips the others) and lets up to 3 frames in a row condition only a
# window around a region's last box; measured on the trained demo SAM2 in
# benchmarks/results/profiles_cpu.json and README "Tracking profiles" (fewer pointers saved
# nothing measurable and cost the reference regime Dice, so every pointer stays).
LEVERS = ("recent_memories", "recent_pointers", "memory_interval", "memory_pool",
          "memory_window")
PROFILES = {"exact": (6, 15, 1, 1, 0), "fast": (2, 15, 2, 1, 3)}
# logit of a low-res mask pixel outside a windowed region's window (sam2's NO_OBJ_SCORE)
OUTSIDE_WINDOW_LOGIT = -1024.0


class GraphRunner(Protocol):
    """What the tracker needs of a loaded bundle (`rau_rt.bundle.Bundle` is one)."""

    @property
    def engines(self) -> Mapping[str, object]: ...

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class TrackerConfig:
    """Tracker settings; defaults are sam2's video predictor's.

    Attributes:
        max_conditioning: conditioning frames kept per region (the reference and the newest
            prompted frames), 1..4; sam2 keeps every one (MemoryBank).
        clip_frames: the clip length sam2 would know; its pointer positions depend on it for
            clips shorter than 16 frames (parity tests); None for a live stream.
        fill_hole_area: low-res background specks filled before output and conditioning memory;
            None takes the bundle's (sam2.json: 8 for sam2's video predictor).
        mask_threshold: logit threshold of the output masks.
        channel_order: of bare uint8/uint16 (H, W, 3) arrays passed to `step` ("rgb" or "bgr");
            a `Frame` carries its own.
        window: VOI (centre, width) of raw X-ray values for `ops.preprocess`, overriding the
            frames' own (`Frame.window`, e.g. a DICOM's WindowCenter/Width); None: theirs.
        profile: "exact" (sam2's memory selection, frame for frame) or "fast" (`PROFILES`).
        recent_memories, recent_pointers: override the profile's count of tracked frames
            attended as spatial memories (0..6) and as object pointers (0..15).
        memory_interval: overrides the profile's frames between a region's stored spatial
            memories (1: every frame, as sam2; k: the memory encoder runs for a tracked region
            only when its newest memory is k frames old; `MemoryConfig`).
        memory_pool: overrides the profile's memory token pooling: 1 (sam2) or MEMORY_POOL,
            which runs the bundle's `memory_attention_pooled` graph (each memory's keys
            averaged over 2 x 2 blocks: a quarter of the keys).
        memory_window: overrides the profile's windowed memory attention: 0 (sam2: every
            token of the frame is conditioned on the region's memory) or k >= 1: up to k frames
            in a row condition only a square of a quarter of the tokens around the region's
            last box (the bundle's `memory_attention_window` graph); the rest of the region's
            features are its previous frame's and its mask is background outside the square.
            A region gets a full pass after k windowed frames, after a prompt, when it was
            absent or its box does not fit the square with a token to spare.
    """

    max_conditioning: int = 2
    clip_frames: int | None = None
    fill_hole_area: int | None = None
    mask_threshold: float = 0.0
    channel_order: str = "rgb"
    window: tuple[float, float] | None = None
    profile: str = "exact"
    recent_memories: int | None = None
    recent_pointers: int | None = None
    memory_interval: int | None = None
    memory_pool: int | None = None
    memory_window: int | None = None

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise InputError(f"profile: expected one of {sorted(PROFILES)}, got {self.profile!r}")
        if self.channel_order not in ("rgb", "bgr"):
            raise InputError(f"channel_order: expected 'rgb' or 'bgr', got {self.channel_order!r}")
        if self.fill_hole_area is not None and self.fill_hole_area < 0:
            raise InputError(f"fill_hole_area: expected >= 0 or None, got {self.fill_hole_area}")
        MemoryConfig((1, 1, 1), 1, self.max_conditioning, self.clip_frames,
                     *self.levers[:3])  # range checks
        if self.levers[3] not in (1, MEMORY_POOL):
            raise InputError(f"memory_pool: expected 1 or {MEMORY_POOL}, got {self.levers[3]}")
        if self.levers[4] < 0:
            raise InputError(f"memory_window: expected 0 (off) or k >= 1 windowed frames in a "
                             f"row, got {self.levers[4]}")
        if self.levers[4] and self.levers[3] != 1:
            raise InputError("memory_window runs sam2's unpooled memory attention on the "
                             "window; it does not combine with memory_pool "
                             f"{self.levers[3]} (with profile {self.profile!r}, set "
                             "memory_window=0 to pool)")

    @property
    def attended(self) -> tuple[int, int]:
        """(recent memories, recent pointers) attended per frame: the profile's unless set."""
        return self.levers[:2]

    @property
    def levers(self) -> tuple[int, int, int, int, int]:
        """The value of each of `LEVERS`: the profile's unless set."""
        chosen = (self.recent_memories, self.recent_pointers, self.memory_interval,
                  self.memory_pool, self.memory_window)
        return tuple(p if c is None else c  # type: ignore[return-value]
                     for c, p in zip(chosen, PROFILES[self.profile], strict=True))

    @property
    def attention_graph(self) -> str:
        """The memory attention graph these levers run."""
        return "memory_attention" if self.levers[3] == 1 else POOLED_MEMORY_ATTENTION

    @property
    def graphs(self) -> tuple[str, ...]:
        """The bundle graphs these settings run: a pipeline opens only these (the other
        memory attention graph would hold its weights and, on TensorRT, its activation memory
        for nothing)."""
        windowed = (WINDOWED_MEMORY_ATTENTION,) if self.levers[4] else ()
        return ("image_encoder", "mask_decoder", self.attention_graph, *windowed,
                "memory_encoder")


@dataclass(frozen=True)
class TrackStep:
    """One frame's tracking output.

    Attributes:
        index: the tracker's frame counter (0 for the first `step`).
        frame_size: (height, width) the masks and boxes are in.
        regions: name -> RegionResult (absent: no mask, no box).
        object_scores: name -> sam2's object score logit (> 0: present).
        low_res_logits: name -> (S/4, S/4) float32 logits after hole filling (what is upsampled).
        stage_ms: wall time per stage (STAGES).
        vision_features: the frame's image-encoder features [1, D, h, w]; None when no
            region was tracked (the encoder did not run).
        windowed: the regions whose memory attention ran on a window (`memory_window`).
    """

    index: int
    frame_size: tuple[int, int]
    regions: Mapping[str, RegionResult]
    object_scores: Mapping[str, float]
    low_res_logits: Mapping[str, np.ndarray]
    stage_ms: Mapping[str, float]
    vision_features: np.ndarray | None = None
    windowed: tuple[str, ...] = ()

    @cached_property
    def descriptor(self) -> np.ndarray | None:
        """`vision_features` pooled to a [D] vector (`rau_rt.reference.pool_features`) for
        view-change detection and reference selection; computed only when asked for."""
        return None if self.vision_features is None else pool_features(self.vision_features)


@dataclass
class _Decoded:
    masks: np.ndarray  # (n, S/4, S/4) selected logits
    pointers: np.ndarray  # (n, D)
    scores: np.ndarray  # (n,)


@dataclass
class _WindowState:
    """What the `memory_window` lever keeps of a region's last tracked frame."""

    features: np.ndarray  # (D, h, w) its conditioned features (outside a window: reused)
    frame: int = -1  # the frame they are of
    box: np.ndarray | None = None  # its mask's box in feature-grid units; None: absent
    run: int = 0  # windowed frames in a row up to `frame`


class Tracker:
    """Tracks regions through a live stream with the four SAM2 graphs of a bundle.

    Args:
        graphs: a loaded SAM2 bundle (`rau_rt.bundle.load_bundle(dir)`), or any `GraphRunner`
            with a `layout` attribute (`rau_rt.export.sam2.graphs.EagerGraphs`).
        config: TrackerConfig.
    """

    def __init__(self, graphs: GraphRunner, config: TrackerConfig | None = None) -> None:
        self._graphs = graphs
        self.config = config or TrackerConfig()
        layout = getattr(graphs, "layout", None)
        self.layout: Sam2Layout = layout if layout is not None else read_layout(graphs.directory)
        engines = graphs.engines
        self._attention = self.config.attention_graph
        # the pooled memory attention stands in for the plain one (a pipeline opens one of them)
        missing = {"image_encoder", "mask_decoder", "memory_encoder"} - set(engines)
        if self._attention == "memory_attention" and self._attention not in engines:
            missing.add(self._attention)
        if missing:
            raise InputError(f"the tracker needs the four SAM2 graphs; missing {sorted(missing)}")
        if self._attention not in engines:
            raise InputError(f"memory_pool {self.config.levers[3]} runs the "
                             f"{self._attention} graph, which this bundle lacks (exported "
                             "before rau-rt pooled memory tokens): re-export it, or use "
                             "memory_pool=1")
        if self.config.levers[4] and WINDOWED_MEMORY_ATTENTION not in engines:
            raise InputError(f"memory_window {self.config.levers[4]} runs the "
                             f"{WINDOWED_MEMORY_ATTENTION} graph, which this bundle lacks "
                             "(exported before rau-rt windowed memory attention): re-export it, "
                             "or use memory_window=0")
        if self.config.levers[3] != self.layout.memory_pool:
            log.warning("memory_pool %d, but these weights were trained with memory_pool %d "
                        "(sam2.json): tracking with another pooling than in training costs "
                        "accuracy (README 'Tracking profiles')", self.config.levers[3],
                        self.layout.memory_pool)
        self._dtypes = {graph: {s.name: np.dtype(s.dtype) for s in engine.inputs}
                        for graph, engine in engines.items()}
        size = self.layout.image_size
        image = next(s for s in engines["image_encoder"].inputs if s.name == "image")
        if tuple(image.shape) != (1, 3, size, size):
            raise InputError(f"image_encoder takes {image.shape}, sam2.json says image size "
                             f"{size}: the bundle is inconsistent; re-export it")
        side = size // 16
        self._memory = MemoryConfig((self.layout.memory_dim, side, side), self.layout.hidden_dim,
                                    self.config.max_conditioning, self.config.clip_frames,
                                    *self.config.levers[:3])
        self._fill = (self.layout.fill_hole_area if self.config.fill_hole_area is None
                      else self.config.fill_hole_area)
        self._banks: dict[str, MemoryBank] = {}
        self._windows: dict[str, _WindowState] = {}  # the memory_window lever's state
        self._pending: dict[str, tuple[np.ndarray, str]] = {}
        self._next = 0
        self._frame_size: tuple[int, int] | None = None
        self._image = np.empty((3, size, size), np.float32)

    # -- state ----------------------------------------------------------------------------
    @property
    def regions(self) -> list[str]:
        """Region names, in the order they were added."""
        return list(self._banks)

    @property
    def frame_index(self) -> int:
        """The index the next `step` gets (frames stepped so far)."""
        return self._next

    @property
    def memory_nbytes(self) -> int:
        """Bytes held by the memory banks (constant per region over the stream)."""
        return (sum(bank.nbytes for bank in self._banks.values())
                + sum(state.features.nbytes for state in self._windows.values()))

    def remove_region(self, name: str) -> None:
        """Stop tracking `name` and drop its memory (other regions are untouched)."""
        if name not in self._banks:
            raise InputError(f"region {name!r} is not tracked; tracked: {self.regions}")
        del self._banks[name]
        self._pending.pop(name, None)
        self._windows.pop(name, None)

    def _room(self, names: Sequence[str]) -> None:
        new = [n for n in names if n not in self._banks]
        if len(self._banks) + len(new) > MAX_REGIONS:
            raise InputError(f"{len(self._banks)} regions tracked, {len(new)} more asked for: the "
                             f"graphs take at most {MAX_REGIONS}; remove some first")

    # -- inputs ---------------------------------------------------------------------------
    def _input(self, frame: Frame | np.ndarray, frame_size: tuple[int, int] | None,
               ) -> tuple[np.ndarray, tuple[int, int]]:
        size = self.layout.image_size
        cfg = self.config
        if isinstance(frame, Frame):
            order = "rgb" if frame.channel_order == "gray" else frame.channel_order
            window = cfg.window if cfg.window is not None else frame.window
            ops.preprocess(frame.image, (size, size), channel_order=order, window=window,
                           bits_stored=frame.bits_stored, out=self._image)
            return self._image, frame.image.shape[:2]
        if not isinstance(frame, np.ndarray):
            raise InputError(f"frame: expected a Frame or numpy.ndarray, got "
                             f"{type(frame).__name__}")
        if frame.dtype == np.float32:
            if frame.shape != (3, size, size):
                raise InputError(f"frame: a float32 frame is a prepared model input (3, {size}, "
                                 f"{size}) (ImageNet-normalized RGB), got {frame.shape}")
            if not np.isfinite(frame).all():
                raise InputError("frame: the float32 model input holds NaN or infinity")
            if frame_size is None:
                raise InputError("frame_size: a prepared model input needs the (height, width) "
                                 "of the frame it came from")
            return frame, (int(frame_size[0]), int(frame_size[1]))
        ops.preprocess(frame, (size, size), channel_order=cfg.channel_order, window=cfg.window,
                       out=self._image)
        return self._image, frame.shape[:2]

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dtypes = self._dtypes[graph]
        cast = {name: np.ascontiguousarray(value, dtype=dtypes[name])
                for name, value in feeds.items()}
        return {name: value.astype(np.float32, copy=False) if value.dtype.kind == "f" else value
                for name, value in self._graphs.run(graph, cast).items()}

    def _decode(self, embed: np.ndarray, encoded: dict[str, np.ndarray], coords: np.ndarray,
                labels: np.ndarray, multimask: bool, mask_input: np.ndarray | None = None,
                ) -> _Decoded:
        n, low = len(embed), self.layout.low_res
        out = self._run("mask_decoder", {
            "image_embed": embed, "high_res_0": encoded["high_res_0"],
            "high_res_1": encoded["high_res_1"], "point_coords": coords,
            "point_labels": labels,
            "mask_input": np.zeros((n, 1, low, low), np.float32) if mask_input is None
            else mask_input,
            "has_mask_input": np.full(n, mask_input is not None)})
        masks, iou, pointers = out["masks"], out["iou"], out["object_pointers"]
        rows = np.arange(n)
        best = iou[:, 1:].argmax(axis=1) + 1
        if multimask:
            return _Decoded(masks[rows, best], pointers[rows, best], out["object_score"][:, 0])
        chosen = np.zeros(n, np.int64)
        if self.layout.multimask_stability:
            flat = masks[:, 0].reshape(n, -1)
            delta = self.layout.stability_delta
            inner = (flat > delta).sum(axis=1)
            outer = (flat > -delta).sum(axis=1)
            stability = np.where(outer > 0, inner / np.maximum(outer, 1), 1.0)
            chosen = np.where(stability >= self.layout.stability_threshold, 0, best)
        return _Decoded(masks[rows, chosen], pointers[:, 0], out["object_score"][:, 0])

    def _fill_holes(self, logits: np.ndarray) -> np.ndarray:
        if self._fill:
            return ops.fill_holes(logits, self._fill, threshold=0.0)
        return logits.copy()

    def describe(self, image: Frame | np.ndarray) -> np.ndarray:
        """An image's pooled image-encoder features ([D], as `TrackStep.descriptor`): a
        reference's descriptor for `ReferenceBank`, or a frame's when nothing is tracked."""
        x, _ = self._input(image, None)
        return pool_features(self._run("image_encoder", {"image": x[None]})["vision_features"])

    # -- reference and prompts ------------------------------------------------------------
    def add_reference(self, image: Frame | np.ndarray,
                      masks_by_region: Mapping[str, np.ndarray], *,
                      frame_size: tuple[int, int] | None = None) -> None:
        """Encode an annotated reference image into pinned conditioning memory per region.

        Args:
            image: the reference image (any size; a `Frame` or an array as `step` takes,
                a prepared float32 model input with `frame_size` included).
            masks_by_region: name -> (H, W) bool/uint8 mask on `image`, not empty. A region
                already tracked gets its reference replaced; a new one starts tracking from it.
        """
        if not masks_by_region:
            raise InputError("masks_by_region: no regions given")
        x, (height, width) = self._input(image, frame_size)
        names = list(masks_by_region)
        self._room(names)
        size = self.layout.image_size
        planes = []
        for name in names:
            mask = np.asarray(masks_by_region[name])
            if mask.shape != (height, width):
                raise InputError(f"reference mask {name!r}: expected ({height}, {width}) like "
                                 f"the image, got {mask.shape}")
            if not mask.any():
                raise InputError(f"reference mask {name!r} is empty; a reference region needs "
                                 "pixels")
            planes.append(mask.astype(np.float32))
        masks = np.stack(planes)
        if (height, width) != (size, size):  # sam2's add_new_mask: antialiased, then >= 0.5
            masks = (ops.resize_antialias(masks, (size, size)) >= 0.5).astype(np.float32)
        n = len(names)
        encoded = self._run("image_encoder", {"image": x[None]})
        features = np.broadcast_to(encoded["vision_features"], (n, *encoded["vision_features"]
                                                                .shape[1:]))
        decoded = self._decode(features, encoded, np.zeros((n, 1, 2), np.float32),
                               np.full((n, 1), -1, np.int32), multimask=False,
                               mask_input=self.layout.mask_downsample(masks))
        low = ops.resize_antialias(masks * (2 * MASK_LOGIT) - MASK_LOGIT,
                               (self.layout.low_res,) * 2)
        memory = self._run("memory_encoder", {
            "vision_features": encoded["vision_features"],
            "masks": self._fill_holes(low)[:, None],
            "object_score": np.full((n, 1), MASK_LOGIT, np.float32),
            "binarize": np.ones(n, bool)})
        frame = self._next - 1
        for i, name in enumerate(names):
            bank = self._banks.get(name) or MemoryBank(self._memory)
            bank.add_conditioning(frame, memory["memory"][i], memory["memory_pos"][i],
                                  decoded.pointers[i], pinned=True)
            self._banks[name] = bank
            self._windows.pop(name, None)  # features conditioned on the old memory

    def prompt(self, frame_index: int, boxes_by_region: Mapping[str, Sequence[float]],
               source: str = "user") -> None:
        """Condition regions on boxes (frame pixels, x1 y1 x2 y2) at frame `frame_index`.

        The boxes apply to the next `step`, whose index `frame_index` must be: the tracker
        cannot go back to a frame it has passed (the pipeline maps late VLM boxes to the newest
        frame). A new name starts a region; a tracked one is re-conditioned.
        """
        if frame_index != self._next:
            raise InputError(f"boxes for frame {frame_index}: the tracker's next frame is "
                             f"{self._next}; it conditions only the frame it processes next")
        if source not in PROMPT_SOURCES:
            raise InputError(f"source: expected one of {PROMPT_SOURCES}, got {source!r}")
        boxes = {}
        for name, box in boxes_by_region.items():
            values = np.asarray(box, dtype=np.float64)
            if values.shape != (4,) or not np.isfinite(values).all():
                raise InputError(f"box {name!r}: expected 4 finite numbers x1 y1 x2 y2, got "
                                 f"{box!r}")
            if values[2] <= values[0] or values[3] <= values[1]:
                raise InputError(f"box {name!r}: expected x1 < x2 and y1 < y2, got {box!r}")
            if self._frame_size is not None:
                h, w = self._frame_size
                if values[2] <= 0 or values[3] <= 0 or values[0] >= w or values[1] >= h:
                    raise InputError(f"box {name!r} {box!r} lies outside the {w}x{h} frame")
            boxes[name] = values.astype(np.float32)
        self._room(list(boxes))
        for name, values in boxes.items():
            self._pending[name] = (values, source)
            self._banks.setdefault(name, MemoryBank(self._memory))

    # -- the per-frame path -----------------------------------------------------------------
    def step(self, frame: Frame | np.ndarray, *,
             frame_size: tuple[int, int] | None = None) -> TrackStep:
        """Track every region into `frame`.

        Args:
            frame: a `Frame`, a uint8/uint16 (H, W) or (H, W, 3) image, or a prepared float32
                (3, S, S) model input (then `frame_size` names the frame it came from).

        Raises:
            InputError: a bad frame (dtype, shape, channels, NaN); the state is unchanged.
            NumericsError: a graph answered NaN or infinity (mask logits, object scores, the
                memory this frame would store); the state is unchanged.
        """
        times = dict.fromkeys(STAGES, 0.0)
        started = time.perf_counter()
        x, frame_size = self._input(frame, frame_size)
        t = self._next
        prompted = [n for n in self._banks if n in self._pending]
        tracked = [n for n in self._banks if n not in self._pending
                   and self._banks[n].conditioning_frames]
        names = prompted + tracked
        clock = time.perf_counter()
        times["preprocess"] = (clock - started) * 1e3
        if not names:
            self._next, self._frame_size = t + 1, frame_size
            return TrackStep(t, frame_size, {}, {}, {}, times)
        encoded = self._run("image_encoder", {"image": x[None]})
        clock = _lap(times, "image_encoder", clock)
        decoded = []
        conditioned = outside = None
        if prompted:
            height, width = frame_size
            size = self.layout.image_size
            scale = np.array([size / width, size / height] * 2, np.float32)
            coords = np.stack([self._pending[n][0] for n in prompted])
            coords = np.clip(coords, 0, [width, height, width, height]) * scale
            n = len(prompted)
            features = np.broadcast_to(encoded["features_no_memory"],
                                       (n, *encoded["features_no_memory"].shape[1:]))
            decoded.append(self._decode(features, encoded, coords.reshape(n, 2, 2),
                                        np.tile(np.array([[2, 3]], np.int32), (n, 1)),
                                        multimask=False))
            clock = _lap(times, "mask_decoder", clock)
        if tracked:
            conditioned, outside = self._attend(encoded, tracked, t)
            clock = _lap(times, "memory_attention", clock)
            n = len(tracked)
            decoded.append(self._decode(conditioned, encoded, np.zeros((n, 1, 2), np.float32),
                                        np.full((n, 1), -1, np.int32), multimask=True))
            if outside is not None:  # a windowed region's mask stays inside its window
                cell = self.layout.low_res // outside.shape[-1]
                decoded[-1].masks[outside.repeat(cell, axis=1).repeat(cell, axis=2)] = (
                    OUTSIDE_WINDOW_LOGIT)
            clock = _lap(times, "mask_decoder", clock)
        logits = np.concatenate([d.masks for d in decoded])
        pointers = np.concatenate([d.pointers for d in decoded])
        scores = np.concatenate([d.scores for d in decoded])
        filled = self._fill_holes(logits)
        binarize = np.arange(len(names)) < len(prompted)
        # rows that store a spatial memory: every prompted region, tracked ones as their
        # bank's memory_interval asks (all of them in sam2's profile)
        rows = np.flatnonzero(binarize | np.array([self._banks[n].wants_memory(t)
                                                   for n in names]))
        stored: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if rows.size:
            # prompted frames enter memory from the filled mask (sam2 encodes them later, from
            # the stored output), tracked frames from the unfilled one
            memory = self._run("memory_encoder", {
                "vision_features": encoded["vision_features"],
                "masks": np.where(binarize[:, None, None], filled, logits)[rows, None],
                "object_score": scores[rows, None], "binarize": binarize[rows]})
            stored = {int(r): (memory["memory"][k], memory["memory_pos"][k])
                      for k, r in enumerate(rows)}
            clock = _lap(times, "memory_encoder", clock)
        post = ops.postprocess_masks(filled, frame_size, threshold=self.config.mask_threshold)
        results = {}
        for i, name in enumerate(names):
            present = bool(scores[i] > 0 and post.areas[i] > 0)
            source = self._pending[name][1] if i < len(prompted) else "track"
            results[name] = RegionResult(
                present=present, mask=post.masks[i].astype(bool) if present else None,
                box=post.boxes[i] if present else None,
                score=float(post.scores[i]) if present else 0.0, source=source)
        _lap(times, "postprocess", clock)
        checked = [("mask_decoder", logits), ("mask_decoder", scores),
                   ("mask_decoder", pointers)]
        if stored:
            checked += [("memory_encoder", memory["memory"]),
                        ("memory_encoder", memory["memory_pos"])]
        for graph, values in checked:
            if not np.isfinite(values).all():  # it would be attended to on every later frame
                raise NumericsError(f"frame {t}: {graph} produced NaN or infinity; nothing was "
                                    "stored and the frame can be stepped again (a faulty "
                                    "engine or graph: re-export or rebuild the bundle)")
        # commit: nothing above changed the tracker
        for i, name in enumerate(names):
            bank = self._banks[name]
            if i < len(prompted):
                bank.add_conditioning(t, *stored[i], pointers[i])
                del self._pending[name]
            else:
                bank.add_tracked(t, *stored.get(i, (None, None)), pointers[i])
        windowed = (np.zeros(len(tracked), bool) if outside is None
                    else outside.any(axis=(1, 2)))  # per tracked region
        if self.config.levers[4]:
            self._keep_windows(names[:len(prompted)], tracked, conditioned, windowed,
                               filled[len(prompted):], scores[len(prompted):], t)
        self._next, self._frame_size = t + 1, frame_size
        order = [n for n in self._banks if n in results]
        return TrackStep(t, frame_size, {n: results[n] for n in order},
                         {n: float(scores[names.index(n)]) for n in order},
                         {n: filled[names.index(n)] for n in order}, times,
                         encoded["vision_features"],
                         tuple(n for n, w in zip(tracked, windowed, strict=True) if w))

    def _attend(self, encoded: dict[str, np.ndarray], names: list[str], t: int,
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Memory attention for `names`, batched: one call per distinct (memories, pointers)
        count (one call in steady state; regions that joined late have less memory), windowed
        regions (`memory_window`) in calls of their own.

        Returns the conditioned features [n, D, h, w] and, where a region was windowed, which
        of its feature cells lie outside its window ([n, h, w] bool; None if none was)."""
        feeds = {n: self._banks[n].feeds(t) for n in names}
        windows = {n: self._window(n, t) for n in names}
        groups: dict[tuple[bool, tuple[int, int]], list[str]] = {}
        for name in names:
            groups.setdefault((windows[name] is not None, feeds[name].counts), []).append(name)
        out = np.empty((len(names), *encoded["vision_features"].shape[1:]), np.float32)
        outside = None  # allocated only when a region runs windowed
        for (windowed, _), members in groups.items():
            chosen = [feeds[n] for n in members]

            def stack(field: str, chosen=chosen) -> np.ndarray:
                if len(chosen) == 1:
                    return getattr(chosen[0], field)[None]
                return np.stack([getattr(f, field) for f in chosen])

            inputs = {
                "current_features": encoded["vision_features"],
                "current_pos": encoded["vision_pos"], "memory": stack("memory"),
                "memory_pos": stack("memory_pos"), "memory_tpos_index": stack("tpos_index"),
                "object_pointers": stack("pointers"),
                "pointer_position": stack("pointer_position")}
            rows = [names.index(n) for n in members]
            if not windowed:
                out[rows] = self._run(self._attention, inputs)["conditioned_features"]
                continue
            index = np.stack([windows[n] for n in members])
            result = self._run(WINDOWED_MEMORY_ATTENTION, {**inputs, "window_index": index})
            inside = result["conditioned_window"].reshape(len(members), out.shape[1], -1)
            if outside is None:
                outside = np.zeros((len(names), *out.shape[2:]), bool)
            for j, (row, name) in enumerate(zip(rows, members, strict=True)):
                features = out[row].reshape(out.shape[1], -1)  # a view into `out`
                features[:] = self._windows[name].features.reshape(out.shape[1], -1)
                features[:, index[j]] = inside[j]
                outside[row] = True
                outside[row].reshape(-1)[index[j]] = False
        return out, outside

    def _window(self, name: str, t: int) -> np.ndarray | None:
        """The token indices of `name`'s window at frame `t`, or None for a full pass: the
        lever is off, the region was not tracked through memory attention at t-1 (new,
        prompted or re-prompted), was absent there, its box does not fit the window with a
        token to spare, or it has had `memory_window` windowed frames in a row (a new
        reference also starts over)."""
        limit = self.config.levers[4]
        state = self._windows.get(name)
        if not limit or state is None or state.frame != t - 1 or state.box is None \
                or state.run >= limit:
            return None
        side = state.features.shape[-1]
        x1, y1, x2, y2 = state.box
        if max(x2 - x1, y2 - y1) > window_side(side) - 1:
            return None
        return window_index(state.box, side)

    def _keep_windows(self, prompted: list[str], tracked: list[str],
                      conditioned: np.ndarray | None, windowed: np.ndarray,
                      logits: np.ndarray, scores: np.ndarray, t: int) -> None:
        """Commit what the `memory_window` lever needs of this frame: each tracked region's
        conditioned features, its box in feature-grid units and its run of windowed frames
        (prompted regions start over: their features had no memory attention)."""
        for name in prompted:
            self._windows.pop(name, None)
        for i, name in enumerate(tracked):
            state = self._windows.get(name)
            if state is None:
                state = self._windows[name] = _WindowState(np.empty_like(conditioned[i]))
            state.run = state.run + 1 if windowed[i] else 0
            state.features[...] = conditioned[i]
            state.frame = t
            fg = logits[i] > self.config.mask_threshold
            state.box = None
            if scores[i] > 0 and fg.any():
                cell = logits.shape[-1] / conditioned.shape[-1]
                rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
                state.box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1],
                                     np.float64) / cell


def _lap(times: dict[str, float], stage: str, since: float) -> float:
    now = time.perf_counter()
    times[stage] += (now - since) * 1e3
    return now
