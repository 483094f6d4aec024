"""TensorRT backend: a serialized engine (`.engine` / `.plan`) run with the TensorRT 10 API.

Written to TensorRT >= 10's named-tensor API (`get_tensor_name`, `set_input_shape`,
`set_tensor_address`, `execute_async_v3`) and never executed in this project's CI, which cannot
install TensorRT; its tests are marked `gpu` and run where `tensorrt` imports.

Device memory and the stream come from `cuda-python` (`cuda.bindings.runtime`, the CUDA runtime
API), not from torch: the runtime path must work without torch (ARCHITECTURE.md rule 4), and
cuda-python is a small wheel that only wraps libcudart. Buffers are allocated once, at each
input's profile maximum, and reused by every call; one stream serializes copy-in, execute and
copy-out. With `EngineConfig.cuda_graph` and static shapes the launch is captured once and
replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from rau_rt.config import DEFAULT_ENGINE_CONFIG, EngineConfig
from rau_rt.engines.base import Engine, check_precision, module_present
from rau_rt.errors import BackendUnavailableError, EngineMismatchError, ShapeError
from rau_rt.types import TensorSpec, format_shape

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install TensorRT 10 on the GPU host: pip install 'tensorrt-cu12>=10,<11' cuda-python "
    "(the wheels download from pypi.nvidia.com), or use JetPack's TensorRT on Jetson "
    "(venv with --system-site-packages); check with `rau-rt doctor`")


def import_tensorrt():
    """`tensorrt` (>= 10), or `BackendUnavailableError` saying how to install it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(f"tensorrt does not import ({exc}); {INSTALL_HINT}") from exc
    major = int(tensorrt.__version__.split(".")[0])
    if major < 10:
        raise BackendUnavailableError(f"tensorrt {tensorrt.__version__} is older than 10 (the "
                                      f"named-tensor API); {INSTALL_HINT}")
    return tensorrt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:  # cuda-python < 12.6 exposed the same module here
            from cuda import cudart
        except ImportError as exc:
            raise BackendUnavailableError(f"cuda-python does not import ({exc}); "
                                          "pip install cuda-python") from exc
    return cudart


def _check(result):
    """Unpack a cuda-python call's (error, *values) tuple, raising on an error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise RuntimeError(f"CUDA runtime error {error}")
    return values[0] if len(values) == 1 else tuple(values)


def host_info(device_index: int = 0) -> dict[str, str]:
    """The TensorRT version and GPU compute capability an engine built here would target."""
    trt = import_tensorrt()
    cudart = _import_cudart()
    props = _check(cudart.cudaGetDeviceProperties(device_index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"tensorrt": trt.__version__, "compute_capability": f"{props.major}.{props.minor}",
            "gpu": name.rstrip("\x00")}


def _numpy_dtype(trt, dtype, name: str) -> str:
    """The numpy dtype name of a TensorRT tensor type; EngineMismatchError for types numpy
    cannot hold (bf16, fp8, int4: rau-rt feeds and reads numpy arrays)."""
    try:
        return np.dtype(trt.nptype(dtype)).name
    except TypeError:
        raise EngineMismatchError(
            f"tensor {name!r} is {dtype} in the engine, which numpy arrays cannot hold; rau-rt "
            "engines take and return fp32/fp16/int input and output tensors (keep reduced "
            "types inside the graph: cast at its boundary)") from None


class TrtEngine(Engine):
    """A deserialized TensorRT engine with one execution context and one CUDA stream."""

    name: ClassVar[str] = "tensorrt"
    suffixes: ClassVar[tuple[str, ...]] = (".engine", ".plan")

    @classmethod
    def available(cls) -> bool:
        return module_present("tensorrt")

    @staticmethod
    def host_info(device_index: int = 0) -> dict[str, str]:
        """See the module function `host_info` (imports tensorrt and cuda-python)."""
        return host_info(device_index)

    @classmethod
    def load(cls, path: str | Path, config: EngineConfig = DEFAULT_ENGINE_CONFIG, *,
             precision: str | None = None) -> TrtEngine:
        if not config.is_cuda:
            raise EngineMismatchError(f"{path}: TensorRT engines run on CUDA only, got device "
                                      f"{config.device!r}; pass EngineConfig(device='cuda')")
        trt = import_tensorrt()
        cudart = _import_cudart()
        _check(cudart.cudaSetDevice(config.device_index))
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise EngineMismatchError(
                f"{path}: TensorRT {trt.__version__} could not deserialize it (built by another "
                f"TensorRT version or for another GPU); rebuild it on this host: rau-rt export "
                f"trt --bundle {Path(path).parent}")
        # TensorRT does not store the build precision (I/O types say nothing about the layers);
        # the manifest records it. A bare engine file is "unknown", which no request matches.
        built = precision or "unknown"
        check_precision(config, built, path)
        return cls(trt, cudart, runtime, engine, built, config)

    def __init__(self, trt, cudart, runtime, engine, precision: str,
                 config: EngineConfig) -> None:
        self._trt, self._cudart = trt, cudart
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        inputs, outputs, self._ranges = [], [], {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dims = tuple(engine.get_tensor_shape(name))
            spec = TensorSpec(name, tuple(d if d >= 0 else None for d in dims),
                              _numpy_dtype(trt, engine.get_tensor_dtype(name), name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                if spec.is_static:
                    self._ranges[name] = (dims, dims)
                else:
                    # Profile 0 is the one this engine runs; its (min, opt, max) bound the feeds.
                    low, _, high = engine.get_tensor_profile_shape(name, 0)
                    self._ranges[name] = (tuple(low), tuple(high))
            else:
                outputs.append(spec)
        super().__init__(tuple(inputs), tuple(outputs), precision, config)
        self._serialize = True  # one execution context, stream and set of buffers
        self._stream = _check(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._graph_exec = None
        self._allocate()

    def _allocate(self) -> None:
        """Device buffers for the largest shapes the profile allows, bound once."""
        for spec in self._inputs:
            self._context.set_input_shape(spec.name, self._ranges[spec.name][1])
        for spec in self._inputs + self._outputs:
            shape = tuple(self._context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise EngineMismatchError(
                    f"output {spec.name!r} has a data-dependent shape {shape}; rau-rt's TensorRT "
                    "engine needs shapes known from the inputs (no IOutputAllocator)")
            nbytes = max(1, int(np.prod(shape)) * np.dtype(spec.dtype).itemsize)
            pointer = _check(self._cudart.cudaMalloc(nbytes))
            self._buffers[spec.name] = (pointer, nbytes)
            self._context.set_tensor_address(spec.name, pointer)

    def _check_profile(self, feeds: Mapping[str, np.ndarray]) -> None:
        for spec in self._inputs:
            low, high = self._ranges[spec.name]
            shape = feeds[spec.name].shape
            if any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
                raise ShapeError(
                    f"input {spec.name!r}: shape {tuple(shape)} is outside the engine's profile "
                    f"{format_shape(low)}..{format_shape(high)}; rebuild with a wider range: "
                    "rau-rt export trt --bundle DIR (ranges come from the manifest)")

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, stream = self._cudart, self._stream
        self._check_profile(feeds)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for spec in self._inputs:
            host = np.ascontiguousarray(feeds[spec.name])
            self._context.set_input_shape(spec.name, host.shape)
            _check(cudart.cudaMemcpyAsync(self._buffers[spec.name][0], host.ctypes.data,
                                          host.nbytes, h2d, stream))
        self._execute()
        results = {}
        for spec in self._outputs:
            out = np.empty(tuple(self._context.get_tensor_shape(spec.name)), dtype=spec.dtype)
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[spec.name][0],
                                          out.nbytes, d2h, stream))
            results[spec.name] = out
        # Pageable host copies return before the data lands: wait before handing arrays out.
        _check(cudart.cudaStreamSynchronize(stream))
        return results

    def _execute(self) -> None:
        static = all(spec.is_static for spec in self._inputs)
        if not (self.config.cuda_graph and static):
            if not self._context.execute_async_v3(int(self._stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            return
        cudart = self._cudart
        if self._graph_exec is None:
            # One plain launch first: TensorRT finishes its shape-dependent setup outside the
            # capture, as its documentation on CUDA graphs asks.
            if not self._context.execute_async_v3(int(self._stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed before CUDA graph capture "
                                   "(see the TensorRT log)")
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            _check(cudart.cudaStreamBeginCapture(self._stream, mode))
            captured = self._context.execute_async_v3(int(self._stream))
            graph = _check(cudart.cudaStreamEndCapture(self._stream))  # end it either way
            if not captured:
                _check(cudart.cudaGraphDestroy(graph))
                raise RuntimeError("TensorRT execute_async_v3 failed while capturing a CUDA "
                                   "graph; run with cuda_graph off (see the TensorRT log)")
            self._graph_exec = _check(cudart.cudaGraphInstantiate(graph, 0))
            _check(cudart.cudaGraphDestroy(graph))
        _check(cudart.cudaGraphLaunch(self._graph_exec, self._stream))

    def _release(self) -> None:
        cudart = self._cudart
        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
        for pointer, _ in self._buffers.values():
            cudart.cudaFree(pointer)
        self._buffers = {}
        cudart.cudaStreamDestroy(self._stream)
        self._context = self._engine = self._runtime = None
