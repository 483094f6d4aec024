"""rau-rt: edge inference runtime for reference-based anatomical understanding (RAU).

Importing this package loads NumPy only: torch, onnxruntime, tensorrt and transformers are
imported lazily by the parts that need them (ARCHITECTURE.md, rule 3).
"""

from rau_rt import ops
from rau_rt._version import __version__
from rau_rt.errors import InputError, NativeUnavailableError, RauRtError

__all__ = ["InputError", "NativeUnavailableError", "RauRtError", "__version__", "ops"]
