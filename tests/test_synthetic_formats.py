"""Synthetic outputs on disk: lossless DICOM/MKV/PNG round trips (read back through the
runtime's own sources), COCO mapped by name, and `rau-rt synth` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rau_rt import cli
from rau_rt.errors import InputError
from rau_rt.io.annotations import read_coco, read_reference_annotation
from rau_rt.io.sources import open_source
from rau_rt.synthetic import SEGMENTS, View, formats, generate_sequence
from rau_rt.synthetic import annotations as ann


def read_back(path):
    """Frames and their metadata through rau_rt.io (the path a user's input takes)."""
    with open_source(path) as source:
        frames = list(source)
    return np.stack([f.image for f in frames]), frames, source


@pytest.fixture(scope="module")
def sequence():
    return generate_sequence(seed=9, frames=24, size=128, fps=7.5, view=View(-30.0, 25.0),
                             segments=("5", "6", "7", "11"))


def test_dicom_round_trip_is_lossless_and_carries_the_cine_header(sequence, tmp_path):
    path = tmp_path / "run.dcm"
    formats.write_dicom(path, sequence)
    frames, decoded, source = read_back(path)
    assert frames.dtype == np.uint16 and np.array_equal(frames, sequence.frames)
    assert source.fps == pytest.approx(7.5, rel=1e-5)
    assert decoded[-1].timestamp_s == pytest.approx(23 / 7.5, rel=1e-5)
    assert {f.bits_stored for f in decoded} == {12} and decoded[0].channel_order == "gray"
    import pydicom

    ds = pydicom.dcmread(path)
    assert float(ds.PositionerPrimaryAngle) == pytest.approx(-30.0)
    assert float(ds.PositionerSecondaryAngle) == 25.0
    assert float(ds.ImagerPixelSpacing[0]) == pytest.approx(
        sequence.meta.imager_pixel_spacing_mm, rel=1e-5)
    assert ds.Modality == "XA" and ds.NumberOfFrames == 24 and ds.CineRate == 8
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image


def test_dicom_bytes_are_deterministic(sequence, tmp_path):
    formats.write_dicom(tmp_path / "a.dcm", sequence)
    formats.write_dicom(tmp_path / "b.dcm", sequence)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


def test_ffv1_video_round_trip_is_lossless_at_7_5_fps(sequence, tmp_path):
    import av

    path = tmp_path / "run.mkv"
    formats.write_video(path, sequence.frames, 7.5)
    frames, decoded, source = read_back(path)
    assert np.array_equal(frames, sequence.frames) and source.fps == 7.5
    assert decoded[0].bits_stored == 12  # carried in the container's BITS_STORED tag
    assert decoded[3].timestamp_s == pytest.approx(3 / 7.5, abs=1e-3)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "ffv1" and stream.average_rate == 7.5


def test_png_sequence_round_trip_is_lossless(sequence, tmp_path):
    formats.write_png_sequence(tmp_path / "frames", sequence.frames)
    frames, decoded, _ = read_back(tmp_path / "frames")
    assert np.array_equal(frames, sequence.frames) and decoded[0].image.dtype == np.uint16


def test_writers_reject_frames_that_are_not_16_bit(tmp_path):
    with pytest.raises(InputError, match="uint16"):
        formats.write_video(tmp_path / "x.mkv", np.zeros((2, 16, 16), np.uint8), 15)
    with pytest.raises(InputError, match="dicom, mkv, png"):
        formats.write_frames(tmp_path, None, "avi")


def _names(sequence):
    return [f"frame_{k:05d}.png" for k in range(len(sequence.frames))]


def test_coco_maps_category_names_to_the_truth(sequence, tmp_path):
    path = tmp_path / "coco.json"
    ann.write_coco(path, sequence, _names(sequence))
    coco = json.loads(path.read_text())  # plain JSON, no pycocotools
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert [names[i + 1] for i in range(len(SEGMENTS))] == list(SEGMENTS)
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == 24 and len(coco["annotations"]) > 20
    for a in coco["annotations"]:
        truth = sequence.truth[a["image_id"] - 1].segments[names[a["category_id"]]]
        x, y, w, h = a["bbox"]
        assert (x, y, x + w, y + h) == truth.box
        assert a["area"] == int(truth.crop.sum())
        polygon = np.array(a["segmentation"][0]).reshape(-1, 2)
        assert polygon[:, 0].min() >= x and polygon[:, 0].max() < x + w


def test_truth_files_hold_exact_masks(sequence, tmp_path):
    ann.write_truth(tmp_path, sequence)
    labels, masks = ann.read_masks(tmp_path / "masks.npz")
    assert np.array_equal(labels, np.stack([t.labels for t in sequence.truth]))
    for t in sequence.truth[::5]:
        for name, seg in t.segments.items():
            assert np.array_equal(masks[name][t.index], seg.mask(128))
    doc = json.loads((tmp_path / "truth.json").read_text())
    assert doc["contrast_start_frame"] == sequence.meta.contrast_start_frame
    last = doc["frames"][-1]["segments"]["7"]
    assert tuple(last["box"]) == sequence.truth[-1].segments["7"].box and last["present"]


@pytest.mark.parametrize("fmt", ["mkv", "png"])
def test_synth_command_writes_sequence_truth_and_reference(tmp_path, capsys, fmt):
    out = tmp_path / "out"
    code = cli.main(["synth", "--out", str(out), "--frames", "6", "--seed", "1", "--size", "64",
                     "--format", fmt, "--segments", "5,6,11"])
    assert code == 0
    frames, _, _ = read_back(out / formats.FRAME_FILES[fmt])
    assert frames.shape == (6, 64, 64) and frames.dtype == np.uint16
    assert np.array_equal(frames, generate_sequence(1, 6, 64, segments=("5", "6", "11")).frames)
    reference = read_reference_annotation(out / "reference.json", known_regions=SEGMENTS)
    assert reference.image.exists() and [r.name for r in reference.regions] == ["5", "6", "11"]
    assert set(read_coco(out / "coco.json")) == {f"frame_{k:05d}.png" for k in range(6)}
    assert (out / "truth.json").exists() and (out / "masks.npz").exists()


def test_synth_command_reports_a_bad_argument(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--size", "100"]) == 1
    assert "multiple of 16" in capsys.readouterr().err
