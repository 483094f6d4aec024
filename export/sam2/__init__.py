"""SAM2 export: a checkpoint -> a verified bundle of the four graphs of sam2's video path.

`exporter` runs the stages (`rau-rt export sam2`); `model` builds or loads the sam2 model,
`graphs` wraps its four per-frame graphs (the input/output contract), `inputs` makes the
verification and calibration inputs. The stages shared with the VLM (graph export, int8,
parity tolerances, TensorRT lint and build) sit one level up in `rau_rt.export`.
"""

__all__ = ["Sam2ExportConfig", "export_sam2", "format_summary", "run_cli"]


def __getattr__(name: str):
    # the exporter's names load it (torch, onnx) on first use: `import rau_rt.export.sam2.<stage>`
    # stays as light as that stage (the runtime-side checks of `verify` need no torch)
    if name in __all__:
        from rau_rt.export.sam2 import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
