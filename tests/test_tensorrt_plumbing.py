"""rau-rt's TensorRT code paths against a stand-in of the TensorRT 10 and cuda-python APIs.

TensorRT cannot be installed here, so this does not test TensorRT: it runs `TrtEngine`,
`export.tensorrt.build` and `export trt` against a small fake written from the documented API
(named tensors, optimization profiles, `execute_async_v3`; cuda-python's `(error, value)`
tuples), whose "engine" computes y = 2 * x with host memory standing in for device memory. It
catches mistakes in rau-rt's own plumbing (buffers, shapes, copies, manifest entries) that would
otherwise surface only on a GPU host. The real engine runs in test_engines_conformance.py
(`gpu`).
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="graphs are built with onnx (pip install '.[export]')")

from rau_rt.bundle import Manifest, load_bundle, read_manifest, write_manifest  # noqa: E402
from rau_rt.config import EngineConfig  # noqa: E402
from rau_rt.engines import tensorrt as trt_engine  # noqa: E402
from rau_rt.errors import BundleError, EngineMismatchError, InputError, ShapeError  # noqa: E402
from rau_rt.export import command, trt_build  # noqa: E402
from rau_rt.export.graph import DynamicDim  # noqa: E402

PLAN = b"FAKE-PLAN"
STATIC_PLAN = b"FAKE-STATIC-PLAN"  # x and y fixed at (2, 4)
PROFILE = ((1, 4), (2, 4), (8, 4))


class FakeCudart:
    """cuda.bindings.runtime's calls used by rau-rt; every call returns (error, *values)."""

    class cudaMemcpyKind:  # cuda-python's names
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeGlobal = 0

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.freed: list[int] = []
        self.launches = 0
        self.capturing = False
        self.captured: list = []  # work recorded into the CUDA graph, replayed by each launch

    def cudaSetDevice(self, index):
        return (0,)

    def cudaGetDeviceProperties(self, index):
        return 0, types.SimpleNamespace(major=8, minor=9, name=b"Fake L4\x00")

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMalloc(self, nbytes):
        buffer = np.zeros(nbytes, np.uint8)
        self.buffers[buffer.ctypes.data] = buffer
        return 0, buffer.ctypes.data

    def cudaFree(self, pointer):
        self.freed.append(pointer)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        ctypes.memmove(dst, src, count)
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = True
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.capturing = False
        return 0, "graph"

    def cudaGraphInstantiate(self, graph, flags):
        return 0, "exec"

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for work in self.captured:
            work()
        return (0,)


class FakeContext:
    def __init__(self, cudart: FakeCudart) -> None:
        self.cudart = cudart
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"]  # y has x's shape

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream):
        assert isinstance(stream, int)
        if self.cudart.capturing:  # recorded, not run: a captured launch executes at replay
            self.cudart.captured.append(self._double)
        else:
            self._double()
        return True

    def _double(self) -> None:
        n = int(np.prod(self.shapes["x"]))
        x = np.ctypeslib.as_array(ctypes.cast(self.addresses["x"],
                                              ctypes.POINTER(ctypes.c_float)), (n,))
        y = np.ctypeslib.as_array(ctypes.cast(self.addresses["y"],
                                              ctypes.POINTER(ctypes.c_float)), (n,))
        y[:] = 2 * x


class FakeEngine:
    num_io_tensors = 2

    def __init__(self, cudart: FakeCudart, static: bool) -> None:
        self.cudart, self.static = cudart, static

    def get_tensor_name(self, index):
        return ("x", "y")[index]

    def get_tensor_shape(self, name):
        return (2, 4) if self.static else (-1, 4)

    def get_tensor_dtype(self, name):
        return "float"

    def get_tensor_mode(self, name):
        return "input" if name == "x" else "output"

    def get_tensor_profile_shape(self, name, profile):
        assert not self.static, "static inputs have no profile to ask for"
        return list(PROFILE)

    def create_execution_context(self):
        return FakeContext(self.cudart)


def fake_tensorrt(built: list, cudart: FakeCudart) -> types.SimpleNamespace:
    """The `tensorrt` module surface rau-rt uses (runtime and builder)."""

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            if data in (PLAN, STATIC_PLAN):
                return FakeEngine(cudart, static=data == STATIC_PLAN)
            return None

    class Network:
        def __init__(self) -> None:
            self.num_inputs = 1

        def get_input(self, index):
            return types.SimpleNamespace(name="x", shape=(-1, 4))

    class Config:
        def __init__(self) -> None:
            self.profiles, self.cache = [], None

        def set_memory_pool_limit(self, pool, size):
            built.append(("workspace", size))

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, data):
            return types.SimpleNamespace(serialize=lambda: b"CACHE" + data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            built.append(("flags", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda *a: built.append(("profile", a)))

        def build_serialized_network(self, network, config):
            return PLAN

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            built.append(("parsed", str(path)))
            return True

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    return types.SimpleNamespace(
        __version__="10.7.0.23", Logger=Logger, Runtime=Runtime, Builder=Builder,
        OnnxParser=OnnxParser, TensorIOMode=types.SimpleNamespace(INPUT="input"),
        nptype=lambda dtype: np.float32,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE=0))


@pytest.fixture
def fakes(monkeypatch):
    built: list = []
    cudart = FakeCudart()
    trt = fake_tensorrt(built, cudart)
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_engine, "_import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_engine.TrtEngine, "available", classmethod(lambda cls: True))
    return types.SimpleNamespace(cudart=cudart, built=built)


@pytest.fixture
def double_bundle(tmp_path):
    """A bundle whose ONNX graph computes y = x + x, with a dynamic first dimension."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "x"], ["y"])], "double",
                                   [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "double.fp32.onnx"))
    from rau_rt.bundle import GraphEntry, file_sha256
    from rau_rt.types import TensorSpec

    spec_x, spec_y = TensorSpec("x", ("n", 4), "float32"), TensorSpec("y", ("n", 4), "float32")
    dim = DynamicDim("n", 1, 8)
    entry = GraphEntry(graph="double", file="double.fp32.onnx", backend="onnxruntime",
                       precision="fp32", inputs=(spec_x,), outputs=(spec_y,),
                       sha256=file_sha256(tmp_path / "double.fp32.onnx"),
                       dynamic_ranges={"x": {"min": [dim.min, 4], "opt": [2, 4],
                                             "max": [dim.max, 4]}})
    write_manifest(tmp_path, Manifest("double", (entry,)))
    return tmp_path


def test_engine_runs_dynamic_shapes_and_checks_the_profile(fakes, tmp_path):
    (tmp_path / "double.engine").write_bytes(PLAN)
    engine = trt_engine.TrtEngine.load(tmp_path / "double.engine", EngineConfig(device="cuda"),
                                       precision="fp16")
    assert [(s.name, s.shape, s.dtype) for s in engine.inputs] == [("x", (None, 4), "float32")]
    # buffers sized once for the profile's maximum (8 x 4 float32 = 128 bytes each)
    assert sorted(nbytes for _, nbytes in engine._buffers.values()) == [128, 128]
    for n in (1, 3, 8):
        x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
        np.testing.assert_array_equal(engine.run({"x": x})["y"], 2 * x)
    with pytest.raises(ShapeError, match=r"outside the engine's profile \(1, 4\)..\(8, 4\)"):
        engine.run({"x": np.zeros((9, 4), np.float32)})
    engine.close()
    engine.close()
    assert len(fakes.cudart.freed) == 2


def test_a_shared_engine_runs_threads_one_call_at_a_time(fakes, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "double.engine").write_bytes(PLAN)
    engine = trt_engine.TrtEngine.load(tmp_path / "double.engine", EngineConfig(device="cuda"),
                                       precision="fp16")

    def calls(k):  # one context and one set of device buffers for every thread
        for i in range(20):
            x = np.full((1 + (k + i) % 8, 4), k * 100 + i, np.float32)
            np.testing.assert_array_equal(engine.run({"x": x})["y"], 2 * x)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(calls, range(4)))
    assert engine._serialize
    engine.close()


def test_engine_refuses_a_plan_it_cannot_deserialize(fakes, tmp_path):
    (tmp_path / "other.engine").write_bytes(b"built elsewhere")
    with pytest.raises(EngineMismatchError, match="rebuild it on this host: rau-rt export trt"):
        trt_engine.TrtEngine.load(tmp_path / "other.engine", EngineConfig(device="cuda"))


def test_cuda_graph_is_captured_once_and_replayed_for_static_shapes(fakes, tmp_path):
    (tmp_path / "static.engine").write_bytes(STATIC_PLAN)
    config = EngineConfig(device="cuda", cuda_graph=True)
    with trt_engine.TrtEngine.load(tmp_path / "static.engine", config) as engine:
        for value in (1.0, 5.0, -2.0):
            x = np.full((2, 4), value, np.float32)
            np.testing.assert_array_equal(engine.run({"x": x})["y"], 2 * x)
    assert fakes.cudart.launches == 3 and len(fakes.cudart.captured) == 1


def test_a_failed_launch_under_capture_is_an_error_not_an_empty_graph(fakes, tmp_path,
                                                                     monkeypatch):
    (tmp_path / "static.engine").write_bytes(STATIC_PLAN)
    config = EngineConfig(device="cuda", cuda_graph=True)
    launches = []

    def fails_while_capturing(self, stream):
        launches.append(self.cudart.capturing)
        return not self.cudart.capturing  # the warm-up launch works, the captured one fails

    monkeypatch.setattr(FakeContext, "execute_async_v3", fails_while_capturing)
    with trt_engine.TrtEngine.load(tmp_path / "static.engine", config) as engine:
        with pytest.raises(RuntimeError, match="while capturing a CUDA graph"):
            engine.run({"x": np.ones((2, 4), np.float32)})
    assert launches == [False, True] and not fakes.cudart.capturing  # the capture was ended


def test_a_tensor_type_numpy_cannot_hold_is_a_typed_mismatch(fakes, tmp_path, monkeypatch):
    import rau_rt.engines.tensorrt as module

    def bf16(dtype):
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    trt = module.import_tensorrt()
    monkeypatch.setattr(trt, "nptype", bf16)
    (tmp_path / "double.engine").write_bytes(PLAN)
    with pytest.raises(EngineMismatchError, match=r"'x' is .* numpy arrays cannot hold"):
        trt_engine.TrtEngine.load(tmp_path / "double.engine", EngineConfig(device="cuda"))


def test_cuda_graph_is_not_used_for_dynamic_shapes(fakes, tmp_path):
    (tmp_path / "double.engine").write_bytes(PLAN)
    config = EngineConfig(device="cuda", cuda_graph=True)
    with trt_engine.TrtEngine.load(tmp_path / "double.engine", config) as engine:
        np.testing.assert_array_equal(engine.run({"x": np.ones((3, 4), np.float32)})["y"], 2)
    assert fakes.cudart.launches == 0 and fakes.cudart.captured == []


def test_export_trt_builds_verifies_and_records_engines(fakes, double_bundle, tmp_path, capsys):
    from rau_rt import cli

    cache = tmp_path / "timing.cache"
    assert cli.main(["export", "trt", "--bundle", str(double_bundle), "--precision", "fp16",
                     "--workspace-gb", "2", "--timing-cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "double: double.fp16.engine (fp16, TensorRT 10.7.0.23, sm_8.9)" in printed
    assert ("flags", 2) in fakes.built  # 1 << STRONGLY_TYPED
    assert ("workspace", 2 << 30) in fakes.built
    assert ("profile", ("x", (1, 4), (2, 4), (8, 4))) in fakes.built
    parsed = [p for kind, p in fakes.built if kind == "parsed"]
    assert parsed == [str(double_bundle / "double.fp16.trt-input.onnx")]  # the fp16-converted graph
    assert cache.read_bytes() == b"CACHE"
    entry = read_manifest(double_bundle).entries("double")[-1]
    assert (entry.backend, entry.precision, entry.device) == ("tensorrt", "fp16", "cuda")
    assert entry.tools["tensorrt"] == "10.7.0.23" and entry.tools["compute_capability"] == "8.9"
    assert entry.parity["passed"] and entry.dynamic_ranges["x"]["max"] == [8, 4]
    assert entry.exporter["command"].startswith(f"rau-rt export trt --bundle {double_bundle} "
                                                "--precision fp16")
    host = {"tensorrt": "10.7.0.23", "compute_capability": "8.9"}
    with load_bundle(double_bundle, backend="tensorrt", config=EngineConfig(device="cuda"),
                     host_info=lambda index: host) as bundle:
        x = np.ones((3, 4), np.float32)
        np.testing.assert_array_equal(bundle.run("double", {"x": x})["y"], 2 * x)
    with load_bundle(double_bundle, backend="auto", host_info=lambda index: host) as bundle:
        assert bundle.entry("double").backend == "tensorrt"


def test_int8_needs_a_qdq_graph(fakes, double_bundle):
    with pytest.raises(InputError, match="int8 engines are built from Q/DQ graphs"):
        trt_build.build(double_bundle / "double.fp32.onnx", double_bundle / "d.engine", "int8")


def test_int8_build_without_a_qdq_entry_in_the_bundle(fakes, double_bundle):
    with pytest.raises(BundleError, match=r"no ONNX entry in \('int8',\)"):
        command.build_bundle(double_bundle, "int8")
