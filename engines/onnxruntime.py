"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers.

On CUDA, inputs and outputs go through IO binding, with static-shape outputs preallocated once on
the device and reused by every call. On CPU, `InferenceSession.run` already writes into arrays it
allocates for us, and binding preallocated CPU buffers would only add a copy to hand the caller
arrays it owns, so the plain call is used there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from rau_rt.config import DEFAULT_ENGINE_CONFIG, EngineConfig
from rau_rt.engines.base import (
    Engine,
    EngineTerminatedError,
    check_precision,
    check_recorded,
    module_present,
)
from rau_rt.errors import BackendUnavailableError, BundleError, EngineMismatchError, InputError
from rau_rt.types import TensorSpec

log = logging.getLogger(__name__)

# ONNX Runtime graph optimizers a CPU session skips. SkipLayerNormFusion turns Add +
# LayerNormalization into SkipLayerNormalization, whose CPU kernel (ORT 1.32) ran 2.7-3.8x
# slower than the two ops it replaces on the 2-core Intel Xeon VM at every shape tried
# ([8,256,128] to [1,4096,256]); without it SAM2's mask decoder ran 8 % faster (micro@256 and
# tiny@512), memory attention up to 3 % (README "Engines and bundles"; `benchmarks.bench_engines`
# times the `onnxruntime` engine against a plain session with the fusion).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)

# ONNX Runtime's type strings -> NumPy dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# Model metadata key the exporters write so that a bare .onnx file names its precision.
PRECISION_METADATA_KEY = "rau_rt.precision"


def _import_ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            f"onnxruntime does not import ({exc}); install it: pip install onnxruntime==1.32.0 "
            "(CPU) or onnxruntime-gpu==1.31.1 (CUDA), never both") from exc
    return onnxruntime


def _spec(node) -> TensorSpec:
    if node.type not in ORT_DTYPES:
        raise InputError(f"tensor {node.name!r}: ONNX type {node.type} is not supported by rau-rt")
    shape = tuple(d if isinstance(d, int | str) else None for d in node.shape)
    return TensorSpec(node.name, shape, ORT_DTYPES[node.type])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OrtEngine(Engine):
    """An ONNX graph in an `onnxruntime.InferenceSession`."""

    name: ClassVar[str] = "onnxruntime"
    suffixes: ClassVar[tuple[str, ...]] = (".onnx",)

    def __init__(self, session, inputs, outputs, precision: str, config: EngineConfig) -> None:
        super().__init__(inputs, outputs, precision, config)
        self._session = session
        self._ort = _import_ort()  # imported already (it made the session): kept off the call path
        self._running: dict[int, object] = {}  # thread id -> RunOptions of its call in flight
        self._binding = None
        self._device_outputs: dict[str, object] = {}
        self._device_inputs: dict[str, object] = {}
        if config.is_cuda and config.io_binding:
            self._prepare_binding()
            self._serialize = True  # one binding: concurrent calls would swap each other's feeds

    @classmethod
    def available(cls) -> bool:
        return module_present("onnxruntime")

    @staticmethod
    def available_providers() -> tuple[str, ...]:
        """The execution providers this onnxruntime build offers (imports onnxruntime)."""
        return tuple(_import_ort().get_available_providers())

    @classmethod
    def load(cls, path: str | Path, config: EngineConfig = DEFAULT_ENGINE_CONFIG, *,
             precision: str | None = None) -> OrtEngine:
        ort = _import_ort()
        path = Path(path)
        providers = cls._providers(ort, config)
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        if not config.spin_wait:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not config.prepack_weights:
            options.add_session_config_entry("session.disable_prepacking", "1")
        model_path = path
        cached = cls._cached_optimized_model(ort, path, config)
        if cached is not None:
            # Already optimized for this ORT build: optimizing again would only cost start time.
            model_path = cached
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            options.graph_optimization_level = getattr(
                ort.GraphOptimizationLevel, _OPT_LEVELS[config.graph_optimization])
            if config.optimized_model_path is not None:
                options.optimized_model_filepath = str(config.optimized_model_path)
        try:
            session = ort.InferenceSession(str(model_path), sess_options=options,
                                           providers=providers,
                                           disabled_optimizers=cls._disabled(providers))
        except (ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                ort.capi.onnxruntime_pybind11_state.NoSuchFile) as exc:
            raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({exc}); the file "
                              "is damaged or not an ONNX model: re-export it") from None
        if cached is None and config.optimized_model_path is not None:
            cls._record_cache_source(ort, path, config)
        # ORT falls back to CPU when CUDA's libraries are missing (it only logs): refuse instead.
        wanted = [p if isinstance(p, str) else p[0] for p in providers]
        if wanted[0] not in session.get_providers():
            raise EngineMismatchError(
                f"{path}: asked for {wanted[0]} but ONNX Runtime loaded {session.get_providers()} "
                "(CUDA/cuDNN or TensorRT libraries missing?); run `rau-rt doctor`")
        inputs = tuple(_spec(n) for n in session.get_inputs())
        outputs = tuple(_spec(n) for n in session.get_outputs())
        stated = session.get_modelmeta().custom_metadata_map.get(PRECISION_METADATA_KEY)
        if stated is not None:
            check_recorded(precision, stated, path)
        floats = {s.dtype for s in inputs} & {"float16", "float32"}
        # Without metadata (a graph from elsewhere) the float inputs are the best evidence.
        precision = precision or stated or ("fp16" if floats == {"float16"} else "fp32")
        check_precision(config, precision, path)
        log.info("onnxruntime %s: %s on %s", ort.__version__, path.name, session.get_providers())
        return cls(session, inputs, outputs, precision, config)

    @staticmethod
    def _providers(ort, config: EngineConfig) -> list:
        if config.providers:
            names = list(config.providers)
        elif config.is_cuda:
            # CPU stays listed for the few ops the CUDA provider lacks (shape ops, NonZero).
            names = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            names = ["CPUExecutionProvider"]
        gpu_names = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
        if not config.is_cuda and gpu_names & set(names):
            raise InputError(f"providers {names} need device='cuda', got {config.device!r}")
        missing = [n for n in names if n not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailableError(
                f"onnxruntime {ort.__version__} lacks {missing} (has "
                f"{ort.get_available_providers()}); for CUDA: pip uninstall -y onnxruntime "
                "onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1")
        device_options = {"device_id": config.device_index}
        if config.cuda_graph:
            device_options["enable_cuda_graph"] = "1"
        return [(n, device_options) if n in gpu_names else n for n in names]

    @staticmethod
    def _cached_optimized_model(ort, source: Path, config: EngineConfig) -> Path | None:
        """The optimized-model cache file, when it was written from this source by this ORT."""
        if config.optimized_model_path is None:
            return None
        cache = Path(config.optimized_model_path)
        stamp = cache.with_name(cache.name + ".source.json")
        if not cache.exists() or not stamp.exists():
            return None
        recorded = json.loads(stamp.read_text())
        return cache if recorded == OrtEngine._cache_key(ort, source, config) else None

    @staticmethod
    def _disabled(providers: list) -> list[str]:
        """The graph optimizers a session with these providers skips (CPU first: see
        CPU_DISABLED_OPTIMIZERS)."""
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        return list(CPU_DISABLED_OPTIMIZERS) if first == "CPUExecutionProvider" else []

    @staticmethod
    def _cache_key(ort, source: Path, config: EngineConfig) -> dict[str, object]:
        # An optimized graph is specific to the source, ORT build, device, level and skipped
        # optimizers that wrote it (level "all" fuses for the host's instruction set).
        return {"sha256": _file_sha256(source), "onnxruntime": ort.__version__,
                "device": config.device, "level": config.graph_optimization,
                "disabled_optimizers": OrtEngine._disabled(OrtEngine._providers(ort, config))}

    @staticmethod
    def _record_cache_source(ort, source: Path, config: EngineConfig) -> None:
        cache = Path(str(config.optimized_model_path))
        stamp = cache.with_name(cache.name + ".source.json")
        stamp.write_text(json.dumps(OrtEngine._cache_key(ort, source, config)))

    def _prepare_binding(self) -> None:
        ort = _import_ort()
        self._binding = self._session.io_binding()
        index = self.config.device_index
        for spec in self._outputs:
            if spec.is_static:
                self._device_outputs[spec.name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(spec.shape), np.dtype(spec.dtype), "cuda", index)
        if self.config.cuda_graph:
            # A captured graph replays fixed device addresses: inputs live in buffers allocated
            # once and overwritten in place, so every input and output must be static.
            dynamic = [s.name for s in self._inputs + self._outputs if not s.is_static]
            if dynamic:
                raise InputError(f"cuda_graph needs static shapes; dynamic: {dynamic}")
            for spec in self._inputs:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(spec.shape), np.dtype(spec.dtype), "cuda", index)
                self._device_inputs[spec.name] = value
                self._binding.bind_ortvalue_input(spec.name, value)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ort = self._ort
        options = ort.RunOptions()
        thread = threading.get_ident()
        self._running[thread] = options  # what `terminate` can stop
        try:
            return self._run_with(feeds, options)
        except ort.capi.onnxruntime_pybind11_state.Fail as exc:
            if options.terminate:
                raise EngineTerminatedError(f"{self.name} run stopped by terminate()") from None
            raise exc
        finally:
            self._running.pop(thread, None)

    def terminate(self, thread: int | None = None) -> None:
        """Stop the call running on `thread` (every running call when None): ONNX Runtime
        checks the flag between nodes and the call raises `EngineTerminatedError`."""
        for owner, options in list(self._running.items()):
            if thread is None or owner == thread:
                options.terminate = True

    def _run_with(self, feeds: Mapping[str, np.ndarray], options) -> dict[str, np.ndarray]:
        if self._binding is None:
            values = self._session.run(None, dict(feeds), options)
            return {spec.name: value for spec, value in zip(self._outputs, values, strict=True)}
        binding = self._binding
        if self._device_inputs:
            for name, value in feeds.items():
                self._device_inputs[name].update_inplace(np.ascontiguousarray(value))
        else:
            binding.clear_binding_inputs()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.clear_binding_outputs()
        for spec in self._outputs:
            if spec.name in self._device_outputs:
                binding.bind_ortvalue_output(spec.name, self._device_outputs[spec.name])
            else:
                binding.bind_output(spec.name, "cuda", self.config.device_index)
        self._session.run_with_iobinding(binding, options)
        values = binding.copy_outputs_to_cpu()
        return {spec.name: value for spec, value in zip(self._outputs, values, strict=True)}

    def _release(self) -> None:
        self._binding = None
        self._device_outputs = {}
        self._device_inputs = {}
        self._session = None
