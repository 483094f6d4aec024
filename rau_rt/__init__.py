"""rau-rt: edge inference runtime for reference-based anatomical understanding (RAU).

Importing this package loads NumPy only: torch, onnxruntime, tensorrt and transformers are
imported lazily by the parts that need them (ARCHITECTURE.md, rule 3). The pipeline API
(`rau_rt.Pipeline`, `rau_rt.open_source`, ...) is imported on first use.
"""

from __future__ import annotations

import os
from importlib import import_module

from rau_rt import ops
from rau_rt._version import __version__
from rau_rt.errors import InputError, NativeUnavailableError, RauRtError

# public name -> module that defines it, imported on first attribute access
_LAZY = {
    "Pipeline": "rau_rt.pipeline",
    "PipelineConfig": "rau_rt.pipeline",
    "KeyframeConfig": "rau_rt.pipeline",
    "open_pipeline": "rau_rt.pipeline",
    "Reference": "rau_rt.reference",
    "Frame": "rau_rt.types",
    "FrameResult": "rau_rt.types",
    "open_source": "rau_rt.io.sources",
}

__all__ = ["InputError", "NativeUnavailableError", "RauRtError", "__version__",
           "load_reference", "ops", *sorted(_LAZY)]


def load_reference(path: str | os.PathLike, name: str | None = None):
    """A `Reference` from the project's reference-annotation JSON and the image it names.

    Raises:
        AnnotationError: the JSON or its image is malformed (naming the offending item).
    """
    from pathlib import Path

    from rau_rt.io.annotations import load_reference_image, read_reference_annotation
    from rau_rt.reference import Reference

    annotation = read_reference_annotation(path)
    return Reference(load_reference_image(annotation), annotation.regions,
                     channel_order="bgr", name=name or Path(path).stem)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rau_rt' has no attribute {name!r}")
