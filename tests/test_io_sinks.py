"""Result sinks: JSONL with RLE masks, mask archives, overlay video, DICOM SEG; atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rau_rt.errors import InputError
from rau_rt.io import rle, sinks
from rau_rt.io.sources import open_source
from rau_rt.types import Frame, FrameResult, RegionResult


def make_results(count=4, size=(48, 64)):
    """Frames of a moving square region 'a' and an always-absent region 'b'."""
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(count):
        image = rng.integers(0, 4096, size, dtype=np.uint16)
        mask = np.zeros(size, bool)
        mask[10 + k:20 + k, 5 + 2 * k:25 + 2 * k] = True
        regions = {
            "a": RegionResult(True, mask, (5 + 2 * k, 10 + k, 25 + 2 * k, 20 + k), 0.9,
                              "vlm" if k == 0 else "track"),
            "b": RegionResult(False, None, None, 0.1, "track"),
        }
        result = FrameResult(k, k / 15, size, regions, {"encoder": 5.0}, 12.5,
                             vlm_staleness=k)
        pairs.append((Frame(k, k / 15, image, "gray", 12), result))
    return pairs


def test_rle_round_trip_and_coco_layout():
    mask = np.zeros((3, 4), bool)
    mask[0, 1] = mask[1, 1] = mask[2, 3] = True
    encoded = rle.encode(mask)
    # column-major: col0 = 000, col1 = 110, col2 = 000, col3 = 001
    assert encoded == {"size": [3, 4], "counts": [3, 2, 6, 1]}
    assert np.array_equal(rle.decode(encoded), mask)
    full = np.ones((2, 2), bool)
    assert rle.encode(full)["counts"] == [0, 4] and rle.decode(rle.encode(full)).all()
    with pytest.raises(InputError, match="sum to"):
        rle.decode({"size": [2, 2], "counts": [1, 1]})


def test_jsonl_sink_writes_one_line_per_frame(tmp_path):
    pairs = make_results()
    path = tmp_path / "results.jsonl"
    with sinks.JsonlSink(path) as sink:
        for frame, result in pairs:
            sink.write(frame, result)
        assert not path.exists() and sink.partial.exists()  # published only on close
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert lines[2]["regions"]["a"]["box"] == [9, 12, 29, 22]
    assert np.array_equal(rle.decode(lines[2]["regions"]["a"]["mask"]),
                          pairs[2][1].regions["a"].mask)
    assert lines[0]["regions"]["b"] == {"present": False, "source": "track", "score": 0.1,
                                        "box": None, "mask": None}
    assert lines[1]["vlm_staleness"] == 1 and lines[0]["stage_ms"] == {"encoder": 5.0}


def test_a_failed_run_leaves_only_the_partial_file(tmp_path):
    path = tmp_path / "results.jsonl"
    with pytest.raises(RuntimeError), sinks.JsonlSink(path) as sink:
        frame, result = make_results(1)[0]
        sink.write(frame, result)
        raise RuntimeError("pipeline crashed")
    assert not path.exists() and (tmp_path / "results.jsonl.partial").exists()


@pytest.mark.parametrize("name", ["masks.npz", "masks"])
def test_mask_archive(tmp_path, name):
    pairs = make_results()
    path = tmp_path / name
    with sinks.MaskArchiveSink(path) as sink:
        for frame, result in pairs:
            sink.write(frame, result)
    if name.endswith(".npz"):
        archive = np.load(path)
        assert sorted(archive.files) == [f"a/{k:06d}" for k in range(4)]
        assert np.array_equal(archive["a/000003"], pairs[3][1].regions["a"].mask)
    else:
        import cv2

        png = cv2.imread(str(path / "a" / "000001.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(png > 0, pairs[1][1].regions["a"].mask)
        assert not (path / "b").exists()


def test_overlay_video_decodes_with_the_masks_drawn(tmp_path):
    pairs = make_results(count=5, size=(47, 63))  # odd sides: padded for yuv420p
    path = tmp_path / "overlay.mp4"
    with sinks.OverlayVideoSink(path) as sink:
        for frame, result in pairs:
            sink.write(frame, result)
    with open_source(path) as source:
        frames = list(source)
    assert len(frames) == 5 and frames[0].channel_order == "bgr"
    assert frames[0].image.shape[:2] == (48, 64)
    assert frames[4].timestamp_s == pytest.approx(4 / 15, abs=2e-3)
    inside = frames[2].image[13:21, 10:28].astype(int)
    # PALETTE[0] is orange-ish in BGR (0, 159, 230): red channel dominates inside the mask
    assert inside[..., 2].mean() > inside[..., 0].mean() + 40
    with pytest.raises(InputError, match="must end in"):
        sinks.OverlayVideoSink(tmp_path / "overlay.gif")


def test_display_view_follows_the_voi_window():
    image = np.array([[0, 1000, 1500, 2000, 4095]], np.uint16)
    plain = sinks.to_bgr8(Frame(0, 0.0, image, "gray", 12))
    windowed = sinks.to_bgr8(Frame(0, 0.0, image, "gray", 12, window=(1500.0, 1000.0)))
    assert plain[0, :, 0].tolist() == [0, 62, 93, 125, 255]  # high bits kept
    assert windowed[0, :, 0].tolist() == [0, 0, 128, 255, 255]  # [1000, 2000] -> [0, 255]
    with pytest.raises(InputError, match="window"):
        Frame(0, 0.0, image, "gray", 12, window=(1500.0, 0.0))


def test_dicom_seg_for_vlm_keyframes(tmp_path):
    import pydicom

    pairs = make_results()
    with sinks.DicomSegSink(tmp_path / "seg") as sink:
        for frame, result in pairs:
            sink.write(frame, result)
    assert sink.written == [0]  # only frame 0 holds a VLM result
    seg = pydicom.dcmread(tmp_path / "seg" / "000000_seg.dcm")
    sc = pydicom.dcmread(tmp_path / "seg" / "000000_sc.dcm")
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "a"
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]\
        .ReferencedSOPInstanceUID == sc.SOPInstanceUID
    assert np.array_equal(seg.pixel_array.astype(bool), pairs[0][1].regions["a"].mask)
