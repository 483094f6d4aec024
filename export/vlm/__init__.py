"""VLM export: a Qwen-VL fine-tune -> verified vision / embed / decoder graphs + tokenizer.

`exporter` runs the stages (`rau-rt export vlm`); `model` loads or builds the model folder,
`graphs` wraps the three graphs, `stages` exports and verifies them, `verify` runs the bundle
end to end against transformers, `quantize` (int8, int4) and `fp16` lower them. The stages
shared with SAM2 sit one level up in `rau_rt.export`.
"""

__all__ = ["VlmExportConfig", "export_vlm", "format_summary"]


def __getattr__(name: str):
    # the exporter's names load it (torch, onnx) on first use: `import rau_rt.export.vlm.<stage>`
    # stays as light as that stage (the runtime-side checks of `verify` need no torch)
    if name in __all__:
        from rau_rt.export.vlm import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
