"""The per-stream pipeline: tracker on every frame, localizer on keyframes (issue 10)."""

from rau_rt.pipeline.keyframes import KeyframeConfig, KeyframePolicy
from rau_rt.pipeline.pipeline import Pipeline, PipelineConfig, PipelineStats

__all__ = ["KeyframeConfig", "KeyframePolicy", "Pipeline", "PipelineConfig", "PipelineStats"]
