"""Typed errors. Every error the runtime raises on purpose derives from `RauRtError`."""


class RauRtError(Exception):
    """Base class of rau-rt's own errors."""


class InputError(RauRtError, ValueError):
    """An input (array, file, annotation, argument) is not what the API expects.

    The message says what was expected and what came, e.g.
    "frame: expected dtype uint8 or uint16, got float32".
    """


class NativeUnavailableError(RauRtError, RuntimeError):
    """The compiled extension `rau_rt._native` was required but is not importable."""
