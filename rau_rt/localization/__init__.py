"""Reference-guided VLM localization: prompt, cached-prefix greedy decoding, constrained
answers, parsing into frame boxes, and the keyframe worker (ARCHITECTURE.md, `localization/`).

Importing it loads neither onnxruntime nor llguidance; both load when a localizer is built.
"""

from rau_rt.localization.localizer import Localizer, LocalizerConfig, LocateResult
from rau_rt.localization.parse import ParsedRegion, parse_answer
from rau_rt.localization.worker import LocalizerWorker, WorkerResult
from rau_rt.vlm_decoding import Decoder, Generation, ImageFeatures, KvCache

__all__ = [
           "Decoder",
           "Generation",
           "ImageFeatures",
           "KvCache",
           "Localizer",
           "LocalizerConfig",
           "LocalizerWorker",
           "LocateResult",
           "ParsedRegion",
           "WorkerResult",
           "parse_answer",
]
