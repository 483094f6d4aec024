"""The per-stream pipeline: tracker on every frame, localizer on keyframes (issue 10)."""

from rau_rt.pipeline.factory import PipelineBundle, open_pipeline
from rau_rt.pipeline.keyframes import KeyframeConfig, KeyframePolicy
from rau_rt.pipeline.pipeline import Pipeline, PipelineConfig, PipelineStats

__all__ = ["KeyframeConfig", "KeyframePolicy", "Pipeline", "PipelineBundle", "PipelineConfig",
           "PipelineStats", "open_pipeline"]
