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


class BundleError(RauRtError, RuntimeError):
    """A model bundle is incomplete or damaged: no manifest, a missing file, a checksum mismatch.

    The message names the file and the command that rebuilds it.
    """


class EngineMismatchError(RauRtError, RuntimeError):
    """An artifact was built for another host or asks for something this engine does not do.

    E.g. a TensorRT engine built with another TensorRT version or for another GPU, or a precision
    or device that differs from the one requested. Never resolved by silently changing either.
    """


class ShapeError(InputError):
    """A feed does not match the graph's input spec (name, rank, size, dtype or profile range)."""


class BackendUnavailableError(RauRtError, RuntimeError):
    """The backend's runtime library (tensorrt, onnxruntime, torch) is not importable here.

    The message says how to install it.
    """


class AnnotationError(InputError):
    """A reference annotation file is malformed; the message names the JSON path of the item
    (e.g. "ref.json: $.regions[2].box: expected 0 <= x1 < x2 <= 512 ...")."""


class DecodingError(RauRtError, RuntimeError):
    """The VLM decode loop cannot go on: a constraint rejected the token it allowed, or left
    no token to choose. A bug or a mismatched tokenizer, never a model answer."""


class NumericsError(RauRtError, RuntimeError):
    """A graph produced NaN or infinity where state would keep it (e.g. a memory the tracker
    would attend to on every later frame). Nothing was stored; the message names the graph."""


class OutputError(RauRtError, OSError):
    """A run's outputs could not be written (disk full, a quota, a read-only or unwritable
    folder). Nothing was published: every output stays under its `.partial` name."""


class RemoteError(RauRtError, RuntimeError):
    """A central localizer server answered with an error that is not about the input (its
    message carries the server's error type and text)."""


class ServerUnavailableError(RemoteError):
    """A central localizer server could not be reached within the client's retries."""
