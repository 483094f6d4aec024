"""The bounded memory bank: what SAM2 remembers of each region, as fixed-size arrays.

It feeds the exported `memory_attention` graph (export/sam2/graphs.py) with exactly the memories
sam2 would attend to, compacted (sam2's own layout: the graph takes 1..MAX_SLOTS spatial
memories and 1..MAX_POINTERS object pointers, no padding), following
SAM2Base._prepare_memory_conditioned_features (notes/sam2_parity.md section 2):

* spatial memories: every conditioning frame (temporal index `num_maskmem - 1` = 6), then the
  tracked frames t-6 ... t-1 that exist, frame t-k at temporal index k-1;
* pointers: every conditioning frame at or before t, then tracked frames t-1 ... t-15 that exist
  (stopping at frame 0), each at the signed offset (t - t_ptr) / t_diff_max with
  t_diff_max = min(clip, 16) - 1;
* memories are rounded to bfloat16 when stored, as sam2 stores `maskmem_features`.

Conditioning frames are the annotated reference (RAU's "SAM2 memory setup") and frames prompted
with a VLM or user box. sam2 attends all of them, so its memory grows with every prompt (sam2
#196); here at most `max_conditioning` are kept (default 2: the reference and the newest
prompt). Eviction: the reference is pinned; a new prompted frame replaces the oldest prompted
one. Tracked frames live in rings of 6 memories and 15 pointers. Within those bounds the
selection is sam2's, frame for frame. Nothing grows: the arrays are allocated once per region,
so memory after 10,000 frames equals memory after 100.

Speed levers (`MemoryConfig`, the tracker's profiles) depart from sam2 on purpose: fewer recent
memories or pointers attended, and `memory_interval`, which stores a tracked frame's spatial
memory only every k frames so the memory encoder skips the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rau_rt.errors import InputError
from rau_rt.sam2_layout import (
    CONDITIONING_TPOS,
    MAX_CONDITIONING,
    RECENT_POINTERS,
    RECENT_SLOTS,
)

POINTER_PERIOD = RECENT_POINTERS + 1  # sam2's max_obj_ptrs_in_encoder (16)


@dataclass(frozen=True)
class MemoryConfig:
    """Shapes and policy of one region's bank.

    Attributes:
        memory_shape: (M, h, w) of one spatial memory (the memory encoder's output).
        pointer_dim: D, the object pointer size.
        max_conditioning: conditioning frames kept (reference + newest prompts), 1..4.
        clip_frames: the clip length sam2 would know (its pointer positions depend on it for
            clips shorter than 16 frames); None for a live stream (as for >= 16 frames).
        recent_memories: tracked frames attended as spatial memories, the nearest first
            (t-1 ... t-k, each at sam2's temporal index k-1), 0..6; sam2 attends 6.
        recent_pointers: tracked frames attended as object pointers (t-1 ... t-k), 0..15;
            sam2 attends 15.
        memory_interval: frames between a region's stored spatial memories, >= 1. 1 (sam2)
            stores every tracked frame's; k stores a tracked frame's memory only when its
            newest memory (conditioning or tracked) is k or more frames old, so the memory
            encoder is skipped on the others (pointers are stored every frame). With k > 1 the
            `recent_memories` newest stored memories are attended, at temporal indices by rank
            (the nearest 0), as sam2's `memory_temporal_stride_for_eval` places strided
            memories.
    """

    memory_shape: tuple[int, int, int]
    pointer_dim: int
    max_conditioning: int = 2
    clip_frames: int | None = None
    recent_memories: int = RECENT_SLOTS
    recent_pointers: int = RECENT_POINTERS
    memory_interval: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.max_conditioning <= MAX_CONDITIONING:
            raise InputError(f"max_conditioning: expected 1..{MAX_CONDITIONING}, got "
                             f"{self.max_conditioning}")
        if self.clip_frames is not None and self.clip_frames < 1:
            raise InputError(f"clip_frames: expected >= 1 or None, got {self.clip_frames}")
        if not 0 <= self.recent_memories <= RECENT_SLOTS:
            raise InputError(f"recent_memories: expected 0..{RECENT_SLOTS}, got "
                             f"{self.recent_memories}")
        if not 0 <= self.recent_pointers <= RECENT_POINTERS:
            raise InputError(f"recent_pointers: expected 0..{RECENT_POINTERS}, got "
                             f"{self.recent_pointers}")
        if self.memory_interval < 1:
            raise InputError(f"memory_interval: expected >= 1, got {self.memory_interval}")

    @property
    def t_diff_max(self) -> float:
        frames = (POINTER_PERIOD if self.clip_frames is None
                  else min(self.clip_frames, POINTER_PERIOD))
        return float(max(frames - 1, 1))


@dataclass
class MemoryFeeds:
    """One region's memory-attention inputs, compacted (views into the bank's buffers)."""

    memory: np.ndarray  # (slots, M, h, w) float32
    memory_pos: np.ndarray  # (slots, M, h, w) float32
    tpos_index: np.ndarray  # (slots,) int64
    pointers: np.ndarray  # (pointers, D) float32
    pointer_position: np.ndarray  # (pointers,) float32
    frames: tuple[int, ...]  # the frame of each spatial memory, in order (for inspection)
    pointer_frames: tuple[int, ...]  # the frame of each pointer, in order

    @property
    def counts(self) -> tuple[int, int]:
        """(spatial memories, pointers): regions with equal counts batch into one call."""
        return len(self.tpos_index), len(self.pointer_position)


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16 (ties to even), kept as float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


class MemoryBank:
    """One region's memory: conditioning frames and rings of recent frames, fixed arrays."""

    def __init__(self, config: MemoryConfig) -> None:
        self.config = config
        m_shape, d = config.memory_shape, config.pointer_dim
        c = config.max_conditioning
        self._cond_mem = np.zeros((c, *m_shape), np.float32)
        self._cond_pos = np.zeros((c, *m_shape), np.float32)
        self._cond_ptr = np.zeros((c, d), np.float32)
        self._cond_frame = np.zeros(c, np.int64)  # the reference may sit before frame 0
        self._cond_used = np.zeros(c, bool)
        self._cond_pinned = np.zeros(c, bool)
        self._recent_mem = np.zeros((RECENT_SLOTS, *m_shape), np.float32)
        self._recent_pos = np.zeros((RECENT_SLOTS, *m_shape), np.float32)
        self._recent_mem_frame = np.full(RECENT_SLOTS, -1, np.int64)  # -1: empty
        self._recent_ptr = np.zeros((RECENT_POINTERS, d), np.float32)
        self._recent_ptr_frame = np.full(RECENT_POINTERS, -1, np.int64)
        slots, pointers = c + RECENT_SLOTS, c + RECENT_POINTERS
        self._out_mem = np.zeros((slots, *m_shape), np.float32)
        self._out_pos = np.zeros((slots, *m_shape), np.float32)
        self._out_tpos = np.zeros(slots, np.int64)
        self._out_ptr = np.zeros((pointers, d), np.float32)
        self._out_ptr_pos = np.zeros(pointers, np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes held, constant over the stream."""
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))

    @property
    def conditioning_frames(self) -> list[int]:
        return sorted(int(f) for f in self._cond_frame[self._cond_used])

    def wants_memory(self, frame: int) -> bool:
        """Whether tracked frame `frame` should store a spatial memory (`memory_interval`)."""
        interval = self.config.memory_interval
        if interval == 1:
            return True
        held = np.concatenate((self._cond_frame[self._cond_used],
                               self._recent_mem_frame[self._recent_mem_frame >= 0]))
        return held.size == 0 or frame - int(held.max()) >= interval

    def _check(self, memory: np.ndarray | None, memory_pos: np.ndarray | None,
               pointer: np.ndarray) -> None:
        """Shapes of a frame's entry; `memory` None (a pointer only) needs `memory_pos` None."""
        shape = self.config.memory_shape
        if (memory is None) != (memory_pos is None) or (
                memory is not None and (memory.shape != shape or memory_pos.shape != shape)):
            raise InputError(f"memory: expected {shape} (or both None), got "
                             f"{getattr(memory, 'shape', None)} / "
                             f"{getattr(memory_pos, 'shape', None)}")
        if pointer.shape != (self.config.pointer_dim,):
            raise InputError(f"pointer: expected ({self.config.pointer_dim},), got "
                             f"{pointer.shape}")

    def add_conditioning(self, frame: int, memory: np.ndarray, memory_pos: np.ndarray,
                         pointer: np.ndarray, *, pinned: bool = False) -> None:
        """Store a conditioning frame (the reference: pinned; a prompted frame: not pinned).

        A full bank replaces its oldest unpinned conditioning frame; a frame already stored
        (as conditioning or tracked) is replaced by this one, as sam2 moves a re-prompted frame
        from the tracked outputs to the conditioning ones.
        """
        self._check(memory, memory_pos, pointer)
        self._drop_recent(frame)
        same = np.flatnonzero(self._cond_used & (self._cond_frame == frame))
        if same.size:
            slot = int(same[0])
        elif (empty := np.flatnonzero(~self._cond_used)).size:
            slot = int(empty[0])
        else:
            candidates = np.flatnonzero(~self._cond_pinned)
            if candidates.size == 0:
                raise InputError(f"all {self.config.max_conditioning} conditioning slots are "
                                 "pinned; raise max_conditioning or unpin the reference")
            slot = int(candidates[np.argmin(self._cond_frame[candidates])])
        self._cond_mem[slot] = to_bfloat16(memory)
        self._cond_pos[slot] = memory_pos
        self._cond_ptr[slot] = pointer
        self._cond_frame[slot] = frame
        self._cond_used[slot] = True
        self._cond_pinned[slot] = pinned

    def add_tracked(self, frame: int, memory: np.ndarray | None, memory_pos: np.ndarray | None,
                    pointer: np.ndarray) -> None:
        """Store a tracked (not prompted) frame in the rings: its pointer, and its spatial
        memory unless `memory` is None (a frame `wants_memory` skipped)."""
        self._check(memory, memory_pos, pointer)
        if frame < 0:
            raise InputError(f"frame: tracked frames are numbered from 0, got {frame}")
        if memory is not None:
            slot = int(np.argmin(self._recent_mem_frame))  # an empty slot (-1) or the oldest
            self._recent_mem[slot] = to_bfloat16(memory)
            self._recent_pos[slot] = memory_pos
            self._recent_mem_frame[slot] = frame
        ptr_slot = frame % RECENT_POINTERS
        self._recent_ptr[ptr_slot] = pointer
        self._recent_ptr_frame[ptr_slot] = frame

    def _drop_recent(self, frame: int) -> None:
        self._recent_mem_frame[self._recent_mem_frame == frame] = -1
        self._recent_ptr_frame[self._recent_ptr_frame == frame] = -1

    def _recent_selection(self, frame: int) -> list[tuple[int, int]]:
        """(ring slot, temporal index) of the tracked memories attended at `frame`, nearest
        first: sam2's frames t-1 ... t-k at index k-1 (a frame without memory leaves its
        index unused), or with `memory_interval` > 1 the newest stored ones ranked 0, 1, ..."""
        count = self.config.recent_memories
        if self.config.memory_interval == 1:
            hits = ((np.flatnonzero(self._recent_mem_frame == frame - k), k - 1)
                    for k in range(1, count + 1) if frame - k >= 0)
            return [(int(hit[0]), tpos) for hit, tpos in hits if hit.size]
        held = np.flatnonzero((self._recent_mem_frame >= 0) & (self._recent_mem_frame < frame))
        newest = held[np.argsort(-self._recent_mem_frame[held], kind="stable")][:count]
        return [(int(i), rank) for rank, i in enumerate(newest)]

    def feeds(self, frame: int) -> MemoryFeeds:
        """Memory-attention inputs for frame `frame`: views valid until the next call.

        Raises:
            InputError: the bank holds no conditioning frame at or before `frame` (sam2 needs
                one to track from).
        """
        cond = sorted((int(i) for i in np.flatnonzero(self._cond_used)
                       if self._cond_frame[i] <= frame), key=lambda k: self._cond_frame[k])
        if not cond:
            raise InputError(f"frame {frame}: no conditioning frame to track from (prompt a box "
                             "or add a reference first)")
        slot, frames = 0, []
        for i in cond:
            self._out_mem[slot], self._out_pos[slot] = self._cond_mem[i], self._cond_pos[i]
            self._out_tpos[slot] = CONDITIONING_TPOS
            frames.append(int(self._cond_frame[i]))
            slot += 1
        for i, tpos in reversed(self._recent_selection(frame)):  # the oldest first, as sam2
            self._out_mem[slot], self._out_pos[slot] = self._recent_mem[i], self._recent_pos[i]
            self._out_tpos[slot] = tpos
            frames.append(int(self._recent_mem_frame[i]))
            slot += 1
        n, scale, pointer_frames = 0, self.config.t_diff_max, []
        for i in cond:
            self._out_ptr[n] = self._cond_ptr[i]
            self._out_ptr_pos[n] = (frame - self._cond_frame[i]) / scale
            pointer_frames.append(int(self._cond_frame[i]))
            n += 1
        for k in range(1, self.config.recent_pointers + 1):
            if frame - k < 0:  # sam2 stops at the clip's start
                break
            hit = np.flatnonzero(self._recent_ptr_frame == frame - k)
            if hit.size:
                self._out_ptr[n] = self._recent_ptr[int(hit[0])]
                self._out_ptr_pos[n] = k / scale
                pointer_frames.append(frame - k)
                n += 1
        return MemoryFeeds(self._out_mem[:slot], self._out_pos[:slot], self._out_tpos[:slot],
                           self._out_ptr[:n], self._out_ptr_pos[:n], tuple(frames),
                           tuple(pointer_frames))
