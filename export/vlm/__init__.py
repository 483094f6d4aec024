"""VLM export: a Qwen-VL fine-tune -> verified vision / embed / decoder graphs + tokenizer.

`exporter` runs the stages (`rau-rt export vlm`); `model` loads or builds the model folder,
`graphs` wraps the three graphs, `stages` exports and verifies them, `verify` runs the bundle
end to end against transformers, `quantize` (int8, int4) and `fp16` lower them. The stages
shared with SAM2 sit one level up in `rau_rt.export`.
"""

from rau_rt.export.vlm.exporter import VlmExportConfig, export_vlm, format_summary

__all__ = ["VlmExportConfig", "export_vlm", "format_summary"]
