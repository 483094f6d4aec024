"""The `Engine` interface every backend implements: named arrays in, named arrays out.

Engines are stateless (ARCHITECTURE.md rule 1): `run` is a function of its feeds; memory banks
and KV caches are arrays the runtime owns and feeds. A backend imports its runtime library only
inside `load`, so `available()` and everything else work on a host without it.
"""

from __future__ import annotations

import importlib.util
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from rau_rt.config import DEFAULT_ENGINE_CONFIG, EngineConfig
from rau_rt.errors import EngineMismatchError, RauRtError, ShapeError
from rau_rt.types import TensorSpec, format_shape


class EngineClosedError(RauRtError, RuntimeError):
    """`run` was called on an engine after `close()`."""


class EngineTerminatedError(RauRtError, RuntimeError):
    """A call in flight was stopped by `Engine.terminate` (a query past its timeout)."""


def module_present(name: str) -> bool:
    """Whether `name` can be imported, found without importing it (no side effects)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def validate_feeds(specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray]) -> None:
    """Check names, ranks, fixed sizes and dtypes of `feeds` against `specs`.

    Raises:
        ShapeError: naming the tensor, what the graph expects and what came.
    """
    expected = {spec.name for spec in specs}
    missing = sorted(expected - set(feeds))
    extra = sorted(set(feeds) - expected)
    if missing or extra:
        raise ShapeError(f"feeds: expected inputs {sorted(expected)}, missing {missing}, "
                         f"unexpected {extra}")
    for spec in specs:
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            raise ShapeError(f"input {spec.name!r}: expected a numpy.ndarray, got "
                             f"{type(value).__name__}")
        if value.dtype != np.dtype(spec.dtype):
            raise ShapeError(f"input {spec.name!r}: expected dtype {spec.dtype}, got "
                             f"{value.dtype} (cast it before run; engines never convert feeds)")
        if not spec.accepts(value.shape):
            raise ShapeError(f"input {spec.name!r}: expected shape {format_shape(spec.shape)}, "
                             f"got {tuple(value.shape)}")


def check_precision(config: EngineConfig, artifact_precision: str, path: Path | str) -> None:
    """Raise when the caller asked for a precision the artifact was not built in."""
    if config.precision is not None and config.precision != artifact_precision:
        raise EngineMismatchError(
            f"{path}: built in {artifact_precision} but EngineConfig.precision is "
            f"{config.precision}; export a {config.precision} graph or drop the precision "
            "request (engines never change precision silently)")


def check_recorded(recorded: str | None, built: str, path: Path | str) -> None:
    """Raise when the manifest's precision for an artifact is not the one the artifact states."""
    if recorded is not None and recorded != built:
        raise EngineMismatchError(
            f"{path}: the manifest records {recorded} but the file was built in {built}; the "
            "manifest belongs to another export: re-export the bundle")


class Engine(ABC):
    """One loaded graph on one device.

    Subclasses set `name` (the registry key) and `suffixes`, implement `available`, `load`,
    `_run` and `_release`, and fill `_inputs`/`_outputs` when loading. A backend whose `_run`
    works through per-engine mutable state (a TensorRT execution context and its buffers, an
    ONNX Runtime IO binding) sets `_serialize`: `run` and `close` then take the engine's lock,
    so one engine shared by threads (the reference bank gives every reference's localizer
    worker the same VLM bundle) runs one call at a time instead of mixing their buffers.
    """

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 precision: str, config: EngineConfig) -> None:
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self.precision = precision
        self.config = config
        self._closed = False
        self._serialize = False
        self._lock = threading.Lock()

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether this host has the backend's runtime library (found, not imported)."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, config: EngineConfig = DEFAULT_ENGINE_CONFIG, *,
             precision: str | None = None) -> Engine:
        """Load the artifact at `path` for `config.device`.

        Args:
            path: The graph file.
            config: Device, threads and the precision the caller expects.
            precision: The artifact's precision as its manifest records it; None reads it from
                the artifact itself.

        Raises:
            BackendUnavailableError: the runtime library does not import.
            EngineMismatchError: the artifact's precision or device is not the requested one.
        """

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The graph's inputs, in graph order."""
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The graph's outputs, in graph order."""
        return self._outputs

    @property
    def closed(self) -> bool:
        """Whether `close()` has been called."""
        return self._closed

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph once.

        Args:
            feeds: One array per input spec, with the spec's dtype and a fitting shape.

        Returns:
            One host array per output spec, owned by the caller (not reused by the next call).

        Raises:
            ShapeError: a feed is missing, extra, or of the wrong shape or dtype.
            EngineClosedError: the engine was closed.
        """
        self._check_open()
        validate_feeds(self._inputs, feeds)
        if not self._serialize:
            return self._run(feeds)
        with self._lock:
            self._check_open()  # closed by another thread while this call waited
            return self._run(feeds)

    def terminate(self, thread: int | None = None) -> None:  # noqa: B027 (optional)
        """Stop the call in flight on `thread` (any, when None) where the backend can: its
        `run` raises `EngineTerminatedError`. Backends that cannot stop a call let it finish
        (the default); ONNX Runtime stops between nodes."""

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(f"{self.name} engine is closed; load it again to run")

    @abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Backend work of `run`, after validation."""

    @abstractmethod
    def _release(self) -> None:
        """Free the backend's resources (called once)."""

    def close(self) -> None:
        """Release sessions, device memory and streams. Calling it again does nothing."""
        with self._lock:  # a serialized engine's running call finishes first
            if not self._closed:
                self._closed = True
                self._release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{format_shape(s.shape)}:{s.dtype}" for s in self._inputs)
        return f"<{type(self).__name__} {self.precision} on {self.config.device}: {ins}>"
