"""The bounded memory bank: what SAM2 remembers of each region, as fixed-size arrays.

It feeds the exported `memory_attention` graph (export/sam2_graphs.py), whose memory is 7
spatial slots and 16 object pointers with validity masks, and follows sam2's selection rules
(SAM2Base._prepare_memory_conditioned_features, notes/sam2_parity.md section 2):

* spatial slots: the conditioning frames first (temporal index `slots - 1` = 6), then the most
  recent tracked frames t-6 ... t-1, frame t-k at temporal index k-1; frames never stored
  (t < 7) are invalid slots, not zeros;
* pointers: every conditioning frame at or before t, then tracked frames t-1 ... t-15, at most
  16, each at the signed offset (t - t_ptr) / t_diff_max with t_diff_max = min(clip, 16) - 1;
* memories are rounded to bfloat16 when stored, as sam2 stores `maskmem_features`.

Where the fixed graph differs from sam2: with two conditioning frames sam2 would attend 2 + 6
spatial memories and 2 + 15 pointers; the bank gives 2 + 5 and 16 (the oldest dropped).

Conditioning frames are the annotated reference (RAU's "SAM2 memory setup") and frames prompted
with a VLM or user box. sam2 attends all of them (unbounded, sam2 #196); here they take at most
`max_conditioning` of the spatial slots, the rest go to recent frames. Eviction: the reference
is pinned; a new prompted frame replaces the oldest prompted one. Tracked frames live in rings.
Nothing grows: the arrays are allocated once per region, so memory after 10,000 frames equals
memory after 100.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rau_rt.errors import InputError

SLOTS = 7  # sam2 num_maskmem: 1 conditioning + 6 recent frames by default
POINTERS = 16  # sam2 max_obj_ptrs_in_encoder
RECENT_POINTERS = POINTERS - 1  # tracked frames t-1 ... t-15


@dataclass(frozen=True)
class MemoryConfig:
    """Shapes and policy of one region's bank.

    Attributes:
        memory_shape: (M, h, w) of one spatial memory (the memory encoder's output).
        pointer_dim: D, the object pointer size.
        max_conditioning: spatial slots conditioning frames may take (reference + prompts).
        clip_frames: the clip length sam2 would know (its pointer positions depend on it for
            clips shorter than 16 frames); None for a live stream (as for >= 16 frames).
    """

    memory_shape: tuple[int, int, int]
    pointer_dim: int
    max_conditioning: int = 2
    clip_frames: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_conditioning < SLOTS:
            raise InputError(f"max_conditioning: expected 1..{SLOTS - 1}, got "
                             f"{self.max_conditioning}")
        if self.clip_frames is not None and self.clip_frames < 1:
            raise InputError(f"clip_frames: expected >= 1 or None, got {self.clip_frames}")

    @property
    def t_diff_max(self) -> float:
        frames = POINTERS if self.clip_frames is None else min(self.clip_frames, POINTERS)
        return float(max(frames - 1, 1))


@dataclass
class MemoryFeeds:
    """One region's memory-attention inputs (the graph's batch axis is added by stacking)."""

    memory: np.ndarray  # (SLOTS, M, h, w) float32
    memory_pos: np.ndarray  # (SLOTS, M, h, w) float32
    tpos_index: np.ndarray  # (SLOTS,) int64
    memory_valid: np.ndarray  # (SLOTS,) bool
    pointers: np.ndarray  # (POINTERS, D) float32
    pointer_position: np.ndarray  # (POINTERS,) float32
    pointer_valid: np.ndarray  # (POINTERS,) bool


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
        recent = SLOTS - 1
        self._recent_mem = np.zeros((recent, *m_shape), np.float32)
        self._recent_pos = np.zeros((recent, *m_shape), np.float32)
        self._recent_mem_frame = np.full(recent, -1, np.int64)  # -1: empty (tracked frames >= 0)
        self._recent_ptr = np.zeros((RECENT_POINTERS, d), np.float32)
        self._recent_ptr_frame = np.full(RECENT_POINTERS, -1, np.int64)
        self._feeds = MemoryFeeds(
            np.zeros((SLOTS, *m_shape), np.float32), np.zeros((SLOTS, *m_shape), np.float32),
            np.zeros(SLOTS, np.int64), np.zeros(SLOTS, bool), np.zeros((POINTERS, d), np.float32),
            np.zeros(POINTERS, np.float32), np.zeros(POINTERS, bool))

    @property
    def nbytes(self) -> int:
        """Bytes held, constant over the stream."""
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray)) + sum(
            a.nbytes for a in vars(self._feeds).values())

    @property
    def conditioning_frames(self) -> list[int]:
        return sorted(int(f) for f in self._cond_frame[self._cond_used])

    def _check(self, memory: np.ndarray, memory_pos: np.ndarray, pointer: np.ndarray) -> None:
        shape = self.config.memory_shape
        if memory.shape != shape or memory_pos.shape != shape:
            raise InputError(f"memory: expected {shape}, got {memory.shape} / {memory_pos.shape}")
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

    def add_tracked(self, frame: int, memory: np.ndarray, memory_pos: np.ndarray,
                    pointer: np.ndarray) -> None:
        """Store the memory of a tracked (not prompted) frame in the rings."""
        self._check(memory, memory_pos, pointer)
        if frame < 0:
            raise InputError(f"frame: tracked frames are numbered from 0, got {frame}")
        slot = frame % len(self._recent_mem_frame)
        self._recent_mem[slot] = to_bfloat16(memory)
        self._recent_pos[slot] = memory_pos
        self._recent_mem_frame[slot] = frame
        ptr_slot = frame % RECENT_POINTERS
        self._recent_ptr[ptr_slot] = pointer
        self._recent_ptr_frame[ptr_slot] = frame

    def _drop_recent(self, frame: int) -> None:
        self._recent_mem_frame[self._recent_mem_frame == frame] = -1
        self._recent_ptr_frame[self._recent_ptr_frame == frame] = -1

    def feeds(self, frame: int) -> MemoryFeeds:
        """Memory-attention inputs for frame `frame` (arrays reused between calls)."""
        out = self._feeds
        out.memory_valid[:] = False
        out.pointer_valid[:] = False
        out.memory[:] = 0.0
        out.memory_pos[:] = 0.0
        out.pointers[:] = 0.0
        out.pointer_position[:] = 0.0
        slot = 0
        # conditioning frames at or before `frame` (a live stream has no later ones), in order
        cond = sorted((int(i) for i in np.flatnonzero(self._cond_used)
                       if self._cond_frame[i] <= frame), key=lambda k: self._cond_frame[k])
        for i in cond:
            out.memory[slot], out.memory_pos[slot] = self._cond_mem[i], self._cond_pos[i]
            out.tpos_index[slot], out.memory_valid[slot] = SLOTS - 1, True
            slot += 1
        recent_room = SLOTS - slot
        # recent frames t-k for k = recent_room ... 1, oldest first (sam2's order)
        for k in range(recent_room, 0, -1):
            past = frame - k
            hit = np.flatnonzero(self._recent_mem_frame == past)
            if past >= 0 and hit.size:
                i = int(hit[0])
                out.memory[slot], out.memory_pos[slot] = self._recent_mem[i], self._recent_pos[i]
                out.tpos_index[slot], out.memory_valid[slot] = k - 1, True
            else:
                out.tpos_index[slot] = k - 1
            slot += 1
        # pointers: conditioning frames at or before t, then t-1 ... t-15
        n, scale = 0, self.config.t_diff_max
        for i in cond:
            out.pointers[n] = self._cond_ptr[i]
            out.pointer_position[n] = (frame - self._cond_frame[i]) / scale
            out.pointer_valid[n] = True
            n += 1
        for k in range(1, RECENT_POINTERS + 1):
            if n >= POINTERS or frame - k < 0:
                break
            hit = np.flatnonzero(self._recent_ptr_frame == frame - k)
            if hit.size:
                out.pointers[n] = self._recent_ptr[int(hit[0])]
                out.pointer_position[n] = k / scale
                out.pointer_valid[n] = True
                n += 1
        return out
