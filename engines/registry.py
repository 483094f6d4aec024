"""Which engine runs an artifact: the explicit backend table, the suffix table, and `auto`.

The only module that names the backends. It imports each one lazily, by module path, when it is
chosen, so a host without tensorrt (or torch) still opens ONNX graphs.

Selection (ARCHITECTURE.md rule 5): an explicit `backend` wins; then the backend the bundle
manifest records (`rau_rt.bundle` passes it as `backend`); then the file's exact suffix; else an
error listing the choices. `backend="auto"` tries tensorrt, then onnxruntime on CUDA, then
onnxruntime on CPU, and logs what it chose and why. Precision and device are never changed.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import replace
from pathlib import Path

from rau_rt.config import DEFAULT_ENGINE_CONFIG, EngineConfig
from rau_rt.engines.base import Engine
from rau_rt.errors import BackendUnavailableError, InputError

log = logging.getLogger(__name__)

# backend name -> (module, class); imported only when that backend is used.
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("rau_rt.engines.onnxruntime", "OrtEngine"),
    "tensorrt": ("rau_rt.engines.tensorrt", "TrtEngine"),
    "aotinductor": ("rau_rt.engines.torch", "AotiEngine"),
    "torch": ("rau_rt.engines.torch", "TorchEagerEngine"),
}
# exact file suffix -> backend. `.pt2` is AOTInductor's package; a `torch.export` archive (also
# `.pt2`) runs eagerly only when `backend="torch"` is named.
SUFFIXES: dict[str, str] = {
    ".onnx": "onnxruntime",
    ".engine": "tensorrt",
    ".plan": "tensorrt",
    ".pt2": "aotinductor",
}
AUTO = "auto"


def backend_class(name: str) -> type[Engine]:
    """The engine class registered as `name`.

    Raises:
        InputError: `name` is not a registered backend (the message lists them).
    """
    if name not in BACKENDS:
        raise InputError(f"backend {name!r} is not one of {sorted(BACKENDS)} (or 'auto')")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def available_backends() -> list[str]:
    """Registered backends whose runtime library this host has (nothing is imported)."""
    return [name for name in BACKENDS if backend_class(name).available()]


def backend_for_path(path: str | Path) -> str:
    """The backend the exact suffix table assigns to `path`.

    Raises:
        InputError: the suffix is not in the table (the message lists the choices).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(
            f"{path}: cannot tell the backend from suffix {suffix!r}; known suffixes "
            f"{SUFFIXES}; pass backend= one of {sorted(BACKENDS)} or 'auto'")
    return SUFFIXES[suffix]


def _ort_has_cuda() -> bool:
    ort = backend_class("onnxruntime")
    return ort.available() and "CUDAExecutionProvider" in ort.available_providers()


def choose_auto(path: str | Path, config: EngineConfig) -> tuple[str, EngineConfig, str]:
    """What `backend="auto"` runs `path` with: (backend, config, reason).

    Order: tensorrt (a built engine, tensorrt importable, CUDA device) -> onnxruntime with the
    CUDA provider -> onnxruntime on CPU. Asking for auto hands the choice of device to this
    function (the choice is logged); a CUDA device in `config` is never downgraded to CPU.
    """
    suffix = Path(path).suffix.lower()
    trt_ok = backend_class("tensorrt").available()
    if SUFFIXES.get(suffix) == "tensorrt":
        if not trt_ok:
            raise BackendUnavailableError(
                f"{path} is a TensorRT engine but tensorrt does not import here; only tensorrt "
                "runs it: install TensorRT 10 or open the bundle's ONNX graph instead")
        device = config.device if config.is_cuda else "cuda"
        return "tensorrt", replace(config, device=device), "a TensorRT engine and tensorrt imports"
    if SUFFIXES.get(suffix) != "onnxruntime":
        raise InputError(f"{path}: backend='auto' chooses among tensorrt and onnxruntime; for "
                         f"{suffix!r} pass backend= one of {sorted(BACKENDS)}")
    skipped = ("tensorrt skipped: an ONNX graph, not a built engine (build one with rau-rt "
               "export trt)" if trt_ok else "tensorrt skipped: it does not import")
    if _ort_has_cuda():
        device = config.device if config.is_cuda else "cuda"
        return "onnxruntime", replace(config, device=device), (
            f"{skipped}; onnxruntime has CUDAExecutionProvider")
    if config.is_cuda:
        raise BackendUnavailableError(
            f"backend='auto' with device={config.device!r}: {skipped}, and onnxruntime has no "
            "CUDAExecutionProvider; install onnxruntime-gpu==1.31.1 or use device='cpu'")
    return "onnxruntime", config, f"{skipped}; onnxruntime has no CUDA provider, running on CPU"


def open_engine(path: str | Path, backend: str | None = None,
                config: EngineConfig = DEFAULT_ENGINE_CONFIG, *,
                precision: str | None = None) -> Engine:
    """Load `path` with the chosen backend.

    Args:
        path: A graph file (`.onnx`, `.engine`/`.plan`, `.pt2`).
        backend: A registered name, "auto", or None to go by the file's suffix.
        config: Device, threads, expected precision.
        precision: The artifact's precision as a manifest records it (None: ask the artifact).

    Raises:
        InputError: unknown backend or suffix (the message lists the choices).
        BackendUnavailableError: the chosen backend's library does not import.
    """
    if backend == AUTO:
        backend, config, reason = choose_auto(path, config)
        log.info("backend auto: %s on %s for %s (%s)", backend, config.device, path, reason)
    elif backend is None:
        backend = backend_for_path(path)
        log.info("backend %s for %s (from its suffix)", backend, path)
    cls = backend_class(backend)
    if not cls.available():
        raise BackendUnavailableError(
            f"backend {backend!r} does not import on this host (available: "
            f"{available_backends()}); `rau-rt doctor` says what is missing")
    return cls.load(path, config, precision=precision)
