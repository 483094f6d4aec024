"""MemoryBank: sam2's memory selection rules over fixed arrays, bounded, bfloat16 storage."""

from __future__ import annotations

import numpy as np
import pytest

from rau_rt.errors import InputError
from rau_rt.sam2_layout import MAX_CONDITIONING
from rau_rt.tracking.memory import MemoryBank, MemoryConfig, to_bfloat16

SHAPE = (4, 2, 3)  # (M, h, w)
DIM = 8


def entry(frame: int):
    """Memory, position and pointer tagged with the frame number (to see which got chosen)."""
    return (np.full(SHAPE, frame + 0.5, np.float32), np.full(SHAPE, -frame, np.float32),
            np.full(DIM, frame, np.float32))


def bank(**kwargs) -> MemoryBank:
    return MemoryBank(MemoryConfig(SHAPE, DIM, **kwargs))


def chosen_frames(feeds) -> list[int]:
    """The frame each spatial memory came from, read from its content (not from `frames`)."""
    chosen = [int(m.flat[0] - 0.5) for m in feeds.memory]
    assert tuple(chosen) == feeds.frames
    assert [int(p[0]) for p in feeds.pointers] == list(feeds.pointer_frames)
    return chosen


def test_first_frames_use_the_conditioning_frame_and_what_exists():
    b = bank()
    b.add_conditioning(0, *entry(0))
    b.add_tracked(1, *entry(1))
    b.add_tracked(2, *entry(2))
    feeds = b.feeds(3)
    # conditioning first (temporal index 6); then the tracked frames among t-6 ... t-1 that
    # exist, compacted as sam2 gathers them: t-2 (index 1), t-1 (index 0)
    assert chosen_frames(feeds) == [0, 1, 2]
    assert feeds.tpos_index.tolist() == [6, 1, 0]
    assert feeds.counts == (3, 3)
    # pointers: conditioning frame at t - 0 = 3, then t-1, t-2; divided by t_diff_max 15
    np.testing.assert_allclose(feeds.pointer_position, np.array([3, 1, 2]) / 15)
    assert feeds.pointers[:, 0].tolist() == [0.0, 2.0, 1.0]


def test_steady_state_keeps_the_last_six_frames_and_fifteen_pointers():
    b = bank()
    b.add_conditioning(0, *entry(0))
    for t in range(1, 100):
        b.add_tracked(t, *entry(t))
    feeds = b.feeds(100)
    assert chosen_frames(feeds) == [0, 94, 95, 96, 97, 98, 99]
    assert feeds.counts == (7, 16)
    assert feeds.pointers[1:, 0].tolist() == list(range(99, 84, -1))  # t-1 ... t-15
    assert feeds.pointer_position[0] == pytest.approx(100 / 15)  # unbounded, as in sam2


def test_short_clips_normalize_pointer_positions_like_sam2():
    b = bank(clip_frames=5)
    b.add_conditioning(0, *entry(0))
    b.add_tracked(1, *entry(1))
    feeds = b.feeds(2)
    np.testing.assert_allclose(feeds.pointer_position[:2], [2 / 4, 1 / 4])


def test_reference_is_pinned_and_new_prompts_replace_old_ones():
    b = bank(max_conditioning=2)
    b.add_conditioning(-1, *entry(-1), pinned=True)  # the annotated reference, before frame 0
    b.add_conditioning(0, *entry(0))
    for t in range(1, 30):
        b.add_tracked(t, *entry(t))
    b.add_conditioning(25, *entry(25))  # a VLM box on frame 25 replaces the frame-0 prompt
    assert b.conditioning_frames == [-1, 25]
    feeds = b.feeds(30)
    # 2 conditioning frames + t-6 ... t-1 (24 ... 29), but 25 is now a conditioning frame:
    # it appears once, as sam2 moves a re-prompted frame to its conditioning outputs
    assert chosen_frames(feeds) == [-1, 25, 24, 26, 27, 28, 29]
    assert feeds.tpos_index.tolist() == [6, 6, 5, 3, 2, 1, 0]
    # pointers: both conditioning frames, then t-1 ... t-15 without 25 (14 of them)
    assert feeds.pointer_frames == (-1, 25, *[f for f in range(29, 14, -1) if f != 25])
    with pytest.raises(InputError, match="pinned"):
        full = bank(max_conditioning=1)
        full.add_conditioning(-1, *entry(-1), pinned=True)
        full.add_conditioning(3, *entry(3))


def test_the_bank_is_bounded():
    b = bank()
    b.add_conditioning(0, *entry(0))
    for t in range(1, 100):
        b.add_tracked(t, *entry(t))
        b.feeds(t + 1)
    size = b.nbytes
    for t in range(100, 10_000):
        b.add_tracked(t, *entry(t))
    b.feeds(10_000)
    assert b.nbytes == size


def test_memories_are_stored_as_bfloat16():
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, 3.14159265, -2.5e-8], np.float32)
    rounded = to_bfloat16(values)
    # bfloat16 keeps 7 mantissa bits (step 2**-7 at 1.0); halfway cases go to the even neighbour
    assert rounded[:5].tolist() == [1.0, 1.0, 1.015625, 1.0, 3.140625]
    assert np.all((rounded.view(np.uint32) & 0xFFFF) == 0)  # low 16 bits cleared
    assert np.abs(rounded - values).max() <= np.abs(values).max() * 2**-8
    b = bank()
    memory = np.full(SHAPE, 1.0 + 2**-9, np.float32)
    b.add_conditioning(0, memory, *entry(0)[1:])
    assert b.feeds(0).memory[0].flat[0] == 1.0
    # the same rounding as sam2's `.to(torch.bfloat16)` of maskmem_features
    torch = pytest.importorskip("torch", reason="torch comes with the [export] extra")
    np.testing.assert_array_equal(
        rounded, torch.from_numpy(values).to(torch.bfloat16).float().numpy())


def test_wrong_shapes_raise_input_error():
    b = bank()
    with pytest.raises(InputError, match="memory: expected"):
        b.add_tracked(1, np.zeros((4, 2, 2), np.float32), *entry(1)[1:])
    with pytest.raises(InputError, match="pointer: expected"):
        b.add_tracked(1, *entry(1)[:2], np.zeros(3, np.float32))
    with pytest.raises(InputError, match="numbered from 0"):
        b.add_tracked(-2, *entry(-2))
    with pytest.raises(InputError, match="max_conditioning"):
        MemoryConfig(SHAPE, DIM, max_conditioning=MAX_CONDITIONING + 1)
    with pytest.raises(InputError, match="no conditioning frame"):
        bank().feeds(3)


@pytest.mark.parametrize("memories, pointers", [(2, 4), (0, 0), (1, 15)])
def test_fewer_attended_frames_keep_the_nearest_at_sam2s_positions(memories, pointers):
    b = bank(recent_memories=memories, recent_pointers=pointers)
    b.add_conditioning(0, *entry(0))
    for t in range(1, 40):
        b.add_tracked(t, *entry(t))
    feeds = b.feeds(40)
    # the conditioning frame, then t-k ... t-1: the same frames and temporal indices sam2 gives
    # them, only fewer
    assert chosen_frames(feeds) == [0, *range(40 - memories, 40)]
    assert feeds.tpos_index.tolist() == [6, *range(memories - 1, -1, -1)]
    assert feeds.pointers[1:, 0].tolist() == list(range(39, 39 - pointers, -1))
    np.testing.assert_allclose(feeds.pointer_position[1:], np.arange(1, pointers + 1) / 15)


def test_attended_counts_are_range_checked():
    with pytest.raises(InputError, match="recent_memories"):
        bank(recent_memories=7)
    with pytest.raises(InputError, match="recent_pointers"):
        bank(recent_pointers=-1)


def test_memory_interval_stores_every_kth_frame_and_attends_the_newest_by_rank():
    b = bank(recent_memories=2, memory_interval=3)
    b.add_conditioning(0, *entry(0))
    stored = []
    for t in range(1, 20):
        if b.wants_memory(t):
            stored.append(t)
            b.add_tracked(t, *entry(t))
        else:
            b.add_tracked(t, None, None, entry(t)[2])  # the pointer only
    # every third frame after the conditioning frame at 0
    assert stored == [3, 6, 9, 12, 15, 18]
    feeds = b.feeds(20)
    # the 2 newest stored memories, the older first, at temporal indices by rank (as sam2's
    # strided memories), and the pointers of every frame
    assert chosen_frames(feeds) == [0, 15, 18]
    assert feeds.tpos_index.tolist() == [6, 1, 0]
    assert list(feeds.pointer_frames) == [0, *range(19, 4, -1)]
    # a re-prompt is a memory too: the next tracked memory comes `memory_interval` after it
    b.add_conditioning(20, *entry(20))
    assert [t for t in range(21, 25) if b.wants_memory(t)] == [23, 24]


def test_memory_interval_one_is_sams_selection_and_is_range_checked():
    plain, strided = bank(), bank(memory_interval=1)
    for b in (plain, strided):
        b.add_conditioning(0, *entry(0))
        for t in range(1, 12):
            assert b.wants_memory(t)
            b.add_tracked(t, *entry(t))
    assert chosen_frames(plain.feeds(12)) == chosen_frames(strided.feeds(12)) == [0, *range(6, 12)]
    with pytest.raises(InputError, match="memory_interval"):
        bank(memory_interval=0)
