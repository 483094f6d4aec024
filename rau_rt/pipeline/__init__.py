"""The per-stream pipeline: tracker on every frame, localizer on keyframes (issue 10).

So far: the keyframe policy (`KeyframePolicy`), which decides when a frame goes to the VLM.
"""

from rau_rt.pipeline.keyframes import KeyframeConfig, KeyframePolicy

__all__ = ["KeyframeConfig", "KeyframePolicy"]
