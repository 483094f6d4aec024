"""SAM2 export: a checkpoint -> a verified bundle of the four graphs of sam2's video path.

`exporter` runs the stages (`rau-rt export sam2`); `model` builds or loads the sam2 model,
`graphs` wraps its four per-frame graphs (the input/output contract), `inputs` makes the
verification and calibration inputs. The stages shared with the VLM (graph export, int8,
parity tolerances, TensorRT lint and build) sit one level up in `rau_rt.export`.
"""

from rau_rt.export.sam2.exporter import Sam2ExportConfig, export_sam2, format_summary, run_cli

__all__ = ["Sam2ExportConfig", "export_sam2", "format_summary", "run_cli"]
