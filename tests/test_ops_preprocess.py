"""`ops.preprocess`: native kernel vs NumPy reference, the reference vs OpenCV, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rau_rt import InputError, ops

requires_native = pytest.mark.skipif(
    not ops.native_available(), reason="rau_rt._native is not built (NumPy path only)"
)


def random_image(rng, shape, dtype):
    high = 4096 if dtype == np.uint16 else 256  # 12-bit X-ray range for uint16
    return rng.integers(0, high, size=shape, dtype=np.int64).astype(dtype)


def assert_parity(image, size, **kwargs):
    expected = ops.preprocess_reference(image, size, **kwargs)
    actual = ops.preprocess(image, size, **kwargs)
    assert actual.shape == (3, *size) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    return actual


def test_native_is_built_when_ci_requires_it():
    # CI installs with RAU_RT_STRICT_NATIVE=1; a silently missing extension must fail there.
    if os.environ.get("RAU_RT_STRICT_NATIVE") == "1":
        assert ops.native_available()
        assert ops.native_info()["built"] is True


@requires_native
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (1, 1, 3), (3, 5, 1), (37, 53, 3), (64, 48)])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (64, 64), (101, 37)])
def test_native_matches_reference_on_odd_sizes(shape, dtype, size):
    rng = np.random.default_rng(abs(hash((shape, size))) % 2**32)
    bits = 12 if dtype == np.uint16 else None
    assert_parity(random_image(rng, shape, dtype), size, bits_stored=bits)


@requires_native
@pytest.mark.parametrize(("shape", "dtype", "size"), [
    ((1080, 1920, 3), np.uint8, (1024, 1024)),
    ((1411, 1411), np.uint16, (512, 512)),
])
def test_native_matches_reference_at_frame_sizes(shape, dtype, size):
    rng = np.random.default_rng(0)
    assert_parity(random_image(rng, shape, dtype), size, window=(2048.0, 3000.0)
                  if dtype == np.uint16 else None)


@requires_native
@pytest.mark.parametrize("channel_order", ["bgr", "rgb"])
def test_native_reads_any_strides(channel_order):
    rng = np.random.default_rng(1)
    base = random_image(rng, (41, 67, 3), np.uint8)
    views = {
        "reversed channels": base[:, :, ::-1],
        "cropped": base[3:30, 5:60],
        "strided": base[::2, ::3],
        "transposed": base.transpose(1, 0, 2),
        "flipped": base[::-1, ::-1],
    }
    for name, view in views.items():
        assert not view.flags.c_contiguous, name
        expected = ops.preprocess_reference(np.ascontiguousarray(view), (29, 31),
                                            channel_order=channel_order)
        actual = ops.preprocess(view, (29, 31), channel_order=channel_order)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=name)


@requires_native
@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 40), width=st.integers(1, 40), channels=st.sampled_from([0, 1, 3]),
    out_h=st.integers(1, 40), out_w=st.integers(1, 40), dtype=st.sampled_from(["u1", "u2"]),
    seed=st.integers(0, 2**32 - 1), windowed=st.booleans(),
)
def test_native_matches_reference_property(height, width, channels, out_h, out_w, dtype, seed,
                                           windowed):
    shape = (height, width) if channels == 0 else (height, width, channels)
    image = random_image(np.random.default_rng(seed), shape, np.dtype(dtype).type)
    window = (1000.0, 1500.0) if windowed else None
    assert_parity(image, (out_h, out_w), window=window, channel_order="rgb")


@requires_native
def test_native_writes_into_the_given_buffer_without_allocating():
    image = random_image(np.random.default_rng(2), (480, 640, 3), np.uint8)
    out = np.empty((3, 256, 256), dtype=np.float32)
    ops.preprocess(image, (256, 256), out=out)  # warm-up: first call resolves thread count etc.
    tracemalloc.start()
    try:
        result = ops.preprocess(image, (256, 256), out=out)
        _, with_out = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        ops.preprocess(image, (256, 256))
        _, without_out = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result is out
    assert with_out < 16 * 1024  # no frame-sized temporary
    assert without_out >= out.nbytes  # the measurement sees an allocation when there is one


def test_reference_matches_opencv_bilinear():
    # OpenCV INTER_LINEAR on float32 is an independent implementation of half-pixel bilinear.
    rng = np.random.default_rng(3)
    for shape, size in [((37, 53, 3), (101, 64)), ((300, 200, 3), (64, 96)), ((5, 9, 3), (5, 9))]:
        image = random_image(rng, shape, np.uint8)
        resized = cv2.resize(image.astype(np.float32), (size[1], size[0]),
                             interpolation=cv2.INTER_LINEAR)
        mean, std = np.array(ops.IMAGENET_MEAN), np.array(ops.IMAGENET_STD)
        expected = ((resized[:, :, ::-1] / 255.0 - mean) / std).transpose(2, 0, 1)
        actual = ops.preprocess_reference(image, size)
        np.testing.assert_allclose(actual, expected, atol=2e-4)


def test_identity_size_is_exact_normalization():
    image = random_image(np.random.default_rng(4), (9, 11), np.uint16)
    actual = ops.preprocess(image, (9, 11), bits_stored=12, mean=(0.5,) * 3, std=(0.25,) * 3)
    expected = (image.astype(np.float64) / 4095 - 0.5) / 0.25
    for plane in actual:  # gray replicated into the three planes
        np.testing.assert_allclose(plane, expected, rtol=1e-5, atol=1e-5)


def test_window_maps_center_and_clips():
    image = np.array([[0, 1000, 2000, 3000, 4000]], dtype=np.uint16)
    out = ops.preprocess(image, (1, 5), window=(2000.0, 2000.0), mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_bgr_input_becomes_rgb_planes():
    rgb = random_image(np.random.default_rng(5), (8, 8, 3), np.uint8)
    from_rgb = ops.preprocess(rgb, (5, 5), channel_order="rgb")
    from_bgr = ops.preprocess(np.ascontiguousarray(rgb[:, :, ::-1]), (5, 5), channel_order="bgr")
    np.testing.assert_array_equal(from_rgb, from_bgr)


@pytest.mark.parametrize(
    ("image", "kwargs", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), {}, "dtype uint8 or uint16"),
        (np.zeros((4, 4, 4), np.uint8), {}, "1 or 3 channels"),
        (np.zeros((2, 4, 4, 3), np.uint8), {}, "shape (H, W)"),
        (np.zeros((0, 4), np.uint8), {}, "non-empty"),
        ([[1, 2], [3, 4]], {}, "numpy.ndarray"),
        (np.zeros((4, 4), np.uint8), {"size": (0, 4)}, "positive"),
        (np.zeros((4, 4), np.uint8), {"size": "big"}, "(height, width)"),
        (np.zeros((4, 4), np.uint8), {"channel_order": "bgra"}, "channel_order"),
        (np.zeros((4, 4), np.uint8), {"std": (1.0, 0.0, 1.0)}, "positive"),
        (np.zeros((4, 4), np.uint8), {"mean": (0.5, 0.5)}, "3 values"),
        (np.zeros((4, 4), np.uint16), {"window": (100.0, 0.0)}, "width > 0"),
        (np.zeros((4, 4), np.uint8), {"bits_stored": 12}, "bits_stored"),
        (np.zeros((4, 4), np.uint8), {"out": np.empty((3, 8, 8), np.float64)}, "float32"),
        (np.zeros((4, 4), np.uint8), {"out": np.empty((3, 8, 9), np.float32)}, "shape"),
        (np.zeros((4, 4), np.uint8), {"out": np.empty((3, 8, 16), np.float32)[:, :, ::2]},
         "C-contiguous"),
    ],
)
def test_bad_input_raises_input_error(image, kwargs, message):
    kwargs = {"size": (8, 8), **kwargs}
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.preprocess(image, **kwargs)


def test_thread_count_follows_setting_and_environment(monkeypatch):
    monkeypatch.setenv("RAU_RT_THREADS", "3")
    assert ops.num_threads() == 3
    ops.set_num_threads(1)
    try:
        assert ops.num_threads() == 1
    finally:
        ops.set_num_threads(None)
    monkeypatch.setenv("RAU_RT_THREADS", "zero")
    with pytest.raises(InputError, match="RAU_RT_THREADS"):
        ops.num_threads()
    monkeypatch.delenv("RAU_RT_THREADS")
    assert ops.num_threads() == ops.physical_cores() >= 1
    with pytest.raises(InputError):
        ops.set_num_threads(0)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, check=False)


def test_reference_path_when_native_is_disabled():
    code = (
        "import numpy as np\nfrom rau_rt import ops\n"
        "assert not ops.native_available()\n"
        "img = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)\n"
        "np.testing.assert_array_equal(ops.preprocess(img, (7, 3)),"
        " ops.preprocess_reference(img, (7, 3)))\n"
    )
    result = run_python(code, RAU_RT_NATIVE="0", RAU_RT_STRICT_NATIVE="0")
    assert result.returncode == 0, result.stderr


def test_strict_mode_raises_when_the_extension_is_missing():
    code = (
        "import sys\nsys.modules['rau_rt._native'] = None  # makes the import fail\n"
        "import numpy as np\nfrom rau_rt import ops, NativeUnavailableError\n"
        "try:\n    ops.preprocess(np.zeros((2, 2), np.uint8), (2, 2))\n"
        "except NativeUnavailableError as exc:\n    print('raised', exc)\n"
    )
    strict = run_python(code, RAU_RT_STRICT_NATIVE="1")
    assert strict.returncode == 0 and "raised" in strict.stdout, strict.stderr
    lenient = run_python(code, RAU_RT_STRICT_NATIVE="0")
    assert lenient.returncode == 0 and "raised" not in lenient.stdout, lenient.stderr


@requires_native
def test_passive_omp_wait_policy_is_set_only_while_loading():
    code = (
        "import os\nfrom rau_rt import ops\n"
        "assert ops.native_available()\n"
        "assert 'OMP_WAIT_POLICY' not in os.environ\n"
        "print(ops.native_info()['omp_wait_policy'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=False)
    assert default.returncode == 0, default.stderr
    assert default.stdout.startswith("PASSIVE")
    user = run_python(code.replace("assert 'OMP_WAIT_POLICY' not in os.environ\n", ""),
                      OMP_WAIT_POLICY="ACTIVE")
    assert user.stdout.strip() == "ACTIVE", user.stderr
