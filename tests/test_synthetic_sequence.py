"""The synthetic generator: determinism, ground-truth consistency, motion bounds, contrast
timing, references and argument checking (issue 3, acceptance "Tests")."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rau_rt.errors import InputError
from rau_rt.geometry import box_from_mask
from rau_rt.synthetic import Motion, View, generate_sequence, make_reference, segments_of

SIZE = 128
SEGMENTS = ("5", "6", "7", "8", "11", "13")


@pytest.fixture(scope="module")
def sequence():
    # 36 frames at 15 fps: empty frames, the fill (0.6-1.3 s) and the start of the plateau
    return generate_sequence(seed=3, frames=36, size=SIZE, fps=15.0, segments=SEGMENTS)


def _extent(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_same_seed_gives_identical_bytes():
    a = generate_sequence(seed=7, frames=12, size=SIZE)
    b = generate_sequence(seed=7, frames=12, size=SIZE)
    assert a.frames.tobytes() == b.frames.tobytes()
    assert a.meta == b.meta
    for ta, tb in zip(a.truth, b.truth, strict=True):
        assert ta.labels.tobytes() == tb.labels.tobytes()
        for name, sa in ta.segments.items():
            sb = tb.segments[name]
            assert sa.box == sb.box and sa.crop.tobytes() == sb.crop.tobytes()
            assert sa.centerline.tobytes() == sb.centerline.tobytes()


def test_different_seed_gives_a_different_tree():
    a = generate_sequence(seed=1, frames=1, size=SIZE, view=View(30, 20), motion=Motion(0, 0))
    b = generate_sequence(seed=2, frames=1, size=SIZE, view=View(30, 20), motion=Motion(0, 0))
    lengths_a = [len(s.centerline) for s in a.truth[0].segments.values()]
    lengths_b = [len(s.centerline) for s in b.truth[0].segments.values()]
    assert lengths_a != lengths_b  # segment lengths are drawn per patient
    assert not np.array_equal(a.frames, b.frames)


def test_box_is_the_mask_extent_and_masks_lie_inside_the_image(sequence):
    checked = 0
    for truth in sequence.truth:
        for seg in truth.segments.values():
            x, y = seg.origin
            h, w = seg.crop.shape
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
            mask = seg.mask(SIZE)
            assert seg.box == _extent(mask)
            assert seg.box == box_from_mask(mask)
            checked += seg.box is not None
    assert checked > 50  # the comparison ran on real, non-empty masks


def test_label_map_pixels_belong_to_their_segment(sequence):
    truth = sequence.truth[-1]
    assert truth.labels.max() > 0
    from rau_rt.synthetic import SEGMENTS as ARCADE

    for name, seg in truth.segments.items():
        labelled = truth.labels == ARCADE.index(name) + 1
        assert not (labelled & ~seg.mask(SIZE)).any(), name


def test_nothing_is_present_before_the_contrast(sequence):
    start = sequence.meta.contrast_start_frame
    assert start >= 1
    for truth in sequence.truth[:start]:
        for seg in truth.segments.values():
            assert not seg.present and seg.box is None and seg.opacified_fraction == 0.0
        assert truth.labels.max() == 0
    # without iodine the vessel pixels look like the background around them
    first = sequence.truth[-1].segments["6"].mask(SIZE)
    assert sequence.frames[0][first].mean() > sequence.frames[-1][first].mean() + 200


def test_every_requested_segment_is_present_once_filled(sequence):
    last = sequence.truth[-1]
    assert set(last.segments) == set(SEGMENTS)
    assert all(seg.present and seg.box is not None for seg in last.segments.values())


def test_the_front_reaches_proximal_segments_before_distal_ones(sequence):
    def first_present(name: str) -> int:
        return next(t.index for t in sequence.truth if t.segments[name].present)

    assert first_present("5") < first_present("7") < first_present("8")
    fractions = [t.segments["8"].opacified_fraction for t in sequence.truth]
    assert fractions == sorted(fractions)  # no washout within the first 2.4 s


def test_late_injection_and_the_8_bit_view():
    # a front minutes away must neither overflow nor leak contrast into early frames
    seq = generate_sequence(seed=6, frames=3, size=64, fps=30.0, contrast_delay_frames=5000)
    assert all(not s.present for t in seq.truth for s in t.segments.values())
    view = seq.frames_8bit()
    assert view.dtype == np.uint8 and view.shape == seq.frames.shape
    assert 100 < view.mean() < 250  # the window puts the body in the upper grey levels


def _max_excursion(sequence) -> float:
    """The largest distance any centerline point travels between two frames."""
    lines = np.stack([np.concatenate([s.centerline for s in t.segments.values()])
                      for t in sequence.truth])  # (T, n, 2)
    pairwise = np.linalg.norm(lines[:, None] - lines[None, :], axis=-1)  # (T, T, n)
    return float(pairwise.max())


@pytest.mark.parametrize(("cardiac", "respiratory"), [(20.0, 0.0), (8.0, 12.0), (0.0, 0.0)])
def test_motion_stays_within_the_requested_amplitude(cardiac, respiratory):
    # 60 bpm: 16 frames at 15 fps cover a whole beat, so end-diastole and end-systole occur
    seq = generate_sequence(seed=5, frames=16, size=256, fps=15.0,
                            motion=Motion(cardiac, respiratory, 60.0), look="classic")
    excursion = _max_excursion(seq)
    assert excursion <= cardiac + respiratory + 1e-3
    if cardiac:
        assert excursion >= 0.9 * cardiac  # the most mobile point uses the amplitude
    else:
        assert excursion == 0.0


def test_cardiac_motion_has_rest_phases():
    seq = generate_sequence(seed=5, frames=30, size=SIZE, fps=30.0,
                            motion=Motion(20.0, 0.0, 55.0), segments=("6",), look="classic")
    lines = np.stack([t.segments["6"].centerline for t in seq.truth])
    steps = np.linalg.norm(np.diff(lines, axis=0), axis=-1).max(axis=1)
    assert (steps < 0.05).sum() >= 3  # consecutive frames that do not move at all
    assert steps.max() > 1.0


def test_reference_is_another_patient_in_another_view():
    target = generate_sequence(seed=11, frames=1, size=SIZE, segments=SEGMENTS)
    ref = make_reference(seed=11, size=SIZE, segments=SEGMENTS, avoid_view=target.meta.view)
    assert ref.image.shape == (SIZE, SIZE) and ref.image.dtype == np.uint16
    assert max(abs(ref.view.primary_deg - target.meta.view.primary_deg),
               abs(ref.view.secondary_deg - target.meta.view.secondary_deg)) >= 20
    assert not np.array_equal(ref.image, target.frames[0])
    assert [r.name for r in ref.regions] == list(SEGMENTS)
    for region in ref.regions:
        x1, y1, x2, y2 = region.box
        assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
        xs = [p[0] for p in region.polygon]
        ys = [p[1] for p in region.polygon]
        assert x1 <= min(xs) and max(xs) < x2 and y1 <= min(ys) and max(ys) < y2


def test_dominance_decides_which_segments_exist():
    assert "15" in segments_of("left", "left") and "15" not in segments_of("left", "right")
    assert "4" in segments_of("right", "right") and "4" not in segments_of("right", "left")
    seq = generate_sequence(seed=2, frames=1, size=SIZE, artery="right", dominance="right")
    assert set(seq.truth[0].segments) == set(segments_of("right", "right"))


def test_stenoses_are_drawn_in_the_published_ranges():
    seq = generate_sequence(seed=4, frames=1, size=SIZE, stenoses=3)
    assert len(seq.meta.stenoses) == 3
    for lesion in seq.meta.stenoses:
        assert 0.25 <= lesion.reduction <= 0.99 and 3 <= lesion.length_mm <= 20
        assert lesion.segment in seq.meta.segments


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"segments": ("5", "99")}, "ARCADE"),
        ({"segments": ("15",)}, "not in a right-dominant"),
        ({"size": 500}, "multiple of 16"),
        ({"fps": 0.0}, "> 0"),
        ({"fps": -15.0}, "> 0"),
        ({"frames": 0}, ">= 1"),
        ({"dominance": "co"}, "right, left"),
        ({"stenoses": 9}, "0..4"),
    ],
)
def test_invalid_arguments_name_the_valid_range(kwargs, expected):
    args = {"seed": 0, "frames": 1, "size": 64, **kwargs}
    with pytest.raises(ValueError, match=expected) as info:
        generate_sequence(**args)
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Motion(50.0, 0.0), "0..40 px"),
        (lambda: Motion(10.0, 31.0), "0..30 px"),
        (lambda: Motion(10.0, 5.0, 130.0), "50..110 bpm"),
        (lambda: View(100.0, 0.0), "-90..90"),
        (lambda: View.parse("LAO"), "PRIMARY,SECONDARY"),
    ],
)
def test_invalid_motion_and_views_name_the_valid_range(make, expected):
    with pytest.raises(InputError, match=expected):
        make()


def test_full_size_sequence_has_angiographic_calibres():
    # Its speed (<= 5 s for 64 frames at 512²) is measured by benchmarks/bench_synthetic.py.
    seq = generate_sequence(seed=0, frames=64, size=512)
    assert seq.frames.shape == (64, 512, 512) and int(seq.frames.max()) <= 4095
    assert 0.25 <= seq.meta.pixel_spacing_mm <= 0.35
    # left main lumen, 4.5 mm (Dodge 1992) at 0.25-0.35 mm/px: 11-20 px across (magnified)
    # the frame where the left main is most opacified (the run may already wash out by frame 63)
    mask = max((t.segments["5"].mask(512) for t in seq.truth), key=np.sum)
    widths = mask.sum(axis=0)[mask.any(axis=0)]
    assert 8 <= np.median(np.concatenate([widths, mask.sum(axis=1)[mask.any(axis=1)]])) <= 24


def test_unknown_look_names_the_choices():
    with pytest.raises(InputError, match="classic"):
        generate_sequence(seed=1, frames=1, size=64, look="cartoon")


def test_clinical_look_hides_truth_under_collimator_blades():
    # seeds whose draw put blades on the field (the look covers 1-3 sides in 60 % of runs)
    checked = 0
    for seed in range(12):
        seq = generate_sequence(seed=seed, frames=30, size=128, contrast_delay_frames=1)
        level = seq.frames[5].astype(np.float32)
        dark = level < np.percentile(level, 1) + 1
        border = np.zeros_like(dark)
        border[:, :4] = border[:, -4:] = True
        border[:4] = border[-4:] = True
        if not (dark & border).any():
            continue
        for truth in seq.truth:
            for seg in truth.segments.values():
                mask = seg.mask(128)
                # no truth pixel where the blade leaves the frame near black
                assert not (mask & dark & border).any()
        checked += 1
    assert checked >= 2


def test_clinical_look_moves_more_and_is_smoother_than_classic():
    def motion_and_grain(look: str) -> tuple[float, float]:
        seq = generate_sequence(seed=2, frames=24, size=256, look=look,
                                segments=("5", "6", "11"))
        steps = [np.median(np.linalg.norm(b.segments[n].centerline - a.segments[n].centerline,
                                          axis=1))
                 for a, b in zip(seq.truth, seq.truth[1:], strict=False) for n in b.segments]
        view = seq.frames_8bit()[0].astype(np.float32)
        grain = float(np.std(view - cv2.GaussianBlur(view, (0, 0), 2)))
        return float(np.mean(steps)), grain

    classic, clinical = motion_and_grain("classic"), motion_and_grain("clinical")
    assert clinical[0] > 1.5 * classic[0]  # notes/real_angiography.md: real motion is 4-8x
    assert clinical[1] < 0.6 * classic[1]  # and its grain 2.5x weaker
