"""Frame sources: synthetic MKV/PNG/DICOM files, pydicom's multi-frame ultrasound (RGB), an image
folder, `synthetic:` URIs, and the typed errors for unreadable input."""

from __future__ import annotations

import numpy as np
import pytest

from rau_rt.errors import InputError
from rau_rt.io.sources import open_source
from rau_rt.synthetic import formats, generate_sequence


@pytest.fixture(scope="module")
def sequence():
    return generate_sequence(seed=4, frames=8, size=64, fps=15.0)


def frames_of(uri, **kwargs):
    with open_source(uri, **kwargs) as source:
        return list(source), source


def test_synthetic_uri_streams_the_generator(sequence):
    frames, source = frames_of("synthetic:seed=4&frames=8&size=64&fps=15")
    assert source.frame_count == 8 and source.fps == 15.0
    assert np.array_equal(np.stack([f.image for f in frames]), sequence.frames)
    assert [f.index for f in frames] == list(range(8))
    assert frames[2].timestamp_s == pytest.approx(2 / 15) and frames[0].bits_stored == 12
    assert frames[0].window == tuple(sequence.meta.window)


def test_multiframe_xa_dicom_12_bit(sequence, tmp_path):
    path = tmp_path / "cine.dcm"
    formats.write_dicom(path, sequence)
    frames, source = frames_of(path)
    assert source.frame_count == 8 and source.fps == pytest.approx(15.0, rel=1e-4)
    assert frames[0].image.dtype == np.uint16 and frames[0].bits_stored == 12
    assert np.array_equal(frames[5].image, sequence.frames[5])
    # the file's VOI window (WindowCenter/Width, 0.1 precision) travels with every frame
    assert frames[3].window == pytest.approx(sequence.meta.window, abs=0.05)


def test_dicom_monochrome1_is_inverted(sequence, tmp_path):
    import pydicom

    path = tmp_path / "cine.dcm"
    formats.write_dicom(path, sequence)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    frames, _ = frames_of(tmp_path / "inverted.dcm")
    assert np.array_equal(frames[1].image, 4095 - sequence.frames[1])
    center, width = sequence.meta.window  # the window inverts with the values
    assert frames[1].window == pytest.approx((4095 - center, width), abs=0.05)
    ds.WindowWidth = "0"
    ds.save_as(tmp_path / "bad_window.dcm")
    with pytest.raises(InputError, match="WindowWidth"):
        frames_of(tmp_path / "bad_window.dcm")


def test_pydicom_multiframe_ultrasound_is_rgb():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("examples_ybr_color.dcm")  # ships in the pydicom wheel
    frames, source = frames_of(path)
    assert len(frames) == 30 and source.fps == pytest.approx(30.0, rel=1e-3)
    assert frames[0].channel_order == "rgb" and frames[0].image.shape == (240, 320, 3)
    assert frames[0].image.dtype == np.uint8 and frames[29].timestamp_s == pytest.approx(
        29 * 0.033333, rel=1e-4)
    # YBR_FULL_422 converted to RGB: a grey ultrasound image has R ~ G ~ B
    spread = np.abs(frames[10].image.astype(int) - frames[10].image.mean(axis=2, keepdims=True))
    assert np.median(spread) <= 3


def test_ffv1_video_keeps_16_bit_and_timestamps(sequence, tmp_path):
    path = tmp_path / "cine.mkv"
    formats.write_video(path, sequence.frames, 15.0)
    frames, source = frames_of(path)
    assert np.array_equal(np.stack([f.image for f in frames]), sequence.frames)
    assert source.fps == 15.0 and frames[7].timestamp_s == pytest.approx(7 / 15, abs=1e-3)


def test_colour_video_is_bgr(tmp_path):
    import av

    path = tmp_path / "colour.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        image = np.zeros((48, 64, 3), np.uint8)
        image[:, :, 2] = 200  # red in BGR
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        container.mux(stream.encode(None))
    frames, _ = frames_of(path)
    assert len(frames) == 3 and frames[0].channel_order == "bgr"
    assert frames[0].image[..., 2].mean() > 150 > frames[0].image[..., 0].mean()


def test_image_folder_in_natural_order(sequence, tmp_path):
    import cv2

    for k in (0, 1, 2, 10):
        cv2.imwrite(str(tmp_path / f"img_{k}.png"), sequence.frames[k % 8])
    frames, source = frames_of(tmp_path, fps=10.0)
    assert source.frame_count == 4
    assert np.array_equal(frames[3].image, sequence.frames[10 % 8])  # img_10 after img_2
    assert frames[3].timestamp_s == pytest.approx(0.3)


def test_truncated_video_raises(sequence, tmp_path):
    path = tmp_path / "cine.mkv"
    formats.write_video(path, sequence.frames, 15.0)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        frames_of(truncated)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x00" * 300), "not a DICOM"),  # named .dcm, not DICOM
        (lambda p: None, "no such file"),
    ],
)
def test_unreadable_dicom_raises_input_error(tmp_path, make, message):
    path = tmp_path / "cine.dcm"
    make(path)
    with pytest.raises(InputError, match=message):
        frames_of(path)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("synthetic:seed=1&colour=red", "unknown parameters"),
        ("synthetic:frames=abc", "invalid literal"),
        ("synthetic:size=100", "multiple of 16"),
        ("camera:front", "camera:N"),
    ],
)
def test_bad_uris_raise_input_error(uri, message):
    with pytest.raises(InputError, match=message):
        frames_of(uri)


def test_garbage_video_and_empty_folder(tmp_path):
    garbage = tmp_path / "clip.mp4"
    garbage.write_bytes(b"definitely not a video" * 20)
    with pytest.raises(InputError, match="cannot open as video"):
        frames_of(garbage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        frames_of(tmp_path / "empty")
