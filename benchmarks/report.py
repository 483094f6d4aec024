"""The README's performance tables, generated from the JSON records in benchmarks/results/.

    python -m benchmarks.report            # print the tables
    python -m benchmarks.report --readme   # rewrite README.md between the perf markers

tests/test_readme.py checks that the README holds exactly what this renders, so the tables
cannot drift from the recorded runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.harness import markdown
from rau_rt.profiling import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# suite file -> heading, in README order
SUITES = {
    "ops_cpu.json": "Pre/post-processing kernels (native vs OpenCV/NumPy, same run)",
    "engines_cpu.json": "Engines on CPU (one conv + attention model, fp32, same run)",
    "sam2_graphs_cpu.json": "SAM2 graphs: eager vs ONNX Runtime fp32 / int8 (same run)",
    "tracker_cpu.json": "Tracker vs sam2's SAM2VideoPredictor per frame (same weights and run)",
    "tracker_cuda.json": "Tracker on a GPU (torch CUDA backend) vs SAM2VideoPredictor, same GPU",
    "localizer_cpu.json": "VLM localizer: cached / constrained keyframe queries vs uncached / "
                          "free / transformers generate",
    "vlm_cpu.json": ("VLM graphs: prefill and per-token decode, fp32 / int8 (weight-only, "
                     "dynamic) / int4 vs transformers"),
    "vlm_scale_cpu.json": ("VLM decoders at Qwen2.5-VL 3B's shapes: per decode token, each "
                           "decoder alone after the fp32 graph (`bench_vlm --scale`)"),
    "pipeline_demo_cpu.json": "Pipeline end to end (`rau-rt bench`): the demo bundle (trained "
                              "demo SAM2 micro 256 px + random-init Qwen2.5-VL tiny 224 px), "
                              "live at 15 fps, profile exact",
    "pipeline_demo_fast_cpu.json": "Pipeline end to end (`rau-rt bench`): the same, profile fast",
    "pipeline_demo_localize_off_cpu.json": "Pipeline end to end (`rau-rt bench --localize off`): "
                                           "the demo bundle's SAM2 alone, no VLM keyframes (as "
                                           "`rau-rt demo` runs), live at 15 fps, profile exact",
    "pipeline_demo_localize_off_fast_cpu.json": "Pipeline end to end (`rau-rt bench --localize "
                                                "off`): the same, profile fast",
    "pipeline_demo8_exact_cpu.json": "Pipeline end to end (`rau-rt bench`): the demo bundle "
                                     "at 8 regions, profile exact, back to back",
    "pipeline_demo8_fast_cpu.json": "Pipeline end to end (`rau-rt bench`): the demo bundle at "
                                    "8 regions, profile fast, back to back",
    "pipeline_tiny512_cpu.json": "Pipeline end to end (`rau-rt bench`): SAM2 tiny 512 px int8 + "
                                 "Qwen2.5-VL tiny 224 px, back to back",
    "synthetic_cpu.json": "Synthetic angiography generator",
    "accuracy_cpu.json": "Task accuracy of the demo SAM2 against exact synthetic truth: Tracker "
                         "fp32 / int8 vs sam2's SAM2VideoPredictor on the same weights, "
                         "held-out cines",
    "accuracy_frames_cpu.json": "The ceiling of tracking: each frame of the same held-out cines "
                                "decoded alone from a box by sam2's SAM2ImagePredictor (no "
                                "memory), same weights",
}
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"


def render() -> str:
    """Markdown for every recorded suite, with versions and the reproduce command."""
    parts = []
    for name, heading in SUITES.items():
        path = RESULTS / name
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items()
                             if isinstance(v, str))
        table = (pipeline_markdown(record) if record.get("suite") == "rau-rt bench"
                 else accuracy_markdown(record)
                 if record.get("suite") in ("accuracy", "accuracy_frames")
                 else markdown(record))
        parts.append(f"**{heading}** ({versions})\n\n{table}")
    return "\n\n".join(parts)


def pipeline_markdown(record: dict[str, object]) -> str:
    """A `rau-rt bench` record: what ran, then its end-to-end and per-stage latency table."""
    precisions = {part: sorted({g["precision"] for g in info["graphs"].values()})
                  for part, info in record["engines"].items()}
    stats = record["pipeline"]
    vlm = record["vlm_query_ms"]
    host = record["host"]
    lines = [
        f"{record['mode']}, {record['frames_processed']} frames processed "
        f"({stats['frames_dropped']} dropped), {len(record['regions'])} regions, "
        f"{record['throughput_fps']:.1f} fps; precisions "
        + ", ".join(f"{part} {'/'.join(p)}" for part, p in precisions.items())
        + (f"; VLM keyframe query p50 {vlm['p50']:.0f} ms ({vlm['count']} queries, in its "
           "worker)" if vlm["count"] else "")
        + f"; peak RSS {record['latency_ms']['peak_rss_mib']:.0f} MiB; {host['cpu']}, "
        f"{host['cores']} cores.",
        "",
        markdown_table(record["latency_ms"]),
        "",
        f"`{record['command']}`",
    ]
    return "\n".join(lines)


def accuracy_markdown(record: dict[str, object]) -> str:
    """An accuracy record: its per-case task table, what ran, and the command."""
    device = record["device"]
    cines = ", ".join(f"seed {c['seed']} ({c['artery']}, {c['look']}: {'/'.join(c['regions'])})"
                      for c in record["cines"])
    keyframes = (f"; box keyframes every {record['keyframe_every']} frames"
                 if "keyframe_every" in record else "")
    return (f"{record['summary_md']}\n\n{len(record['cines'])} held-out cines of "
            f"{record['frames']} frames at 512² ({cines}){keyframes}; ms/frame for 4 regions on "
            f"{device['cpu']}, {device['physical_cores']} cores. Reproduce: "
            f"`{record['command']}`")


def rewrite_readme(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + render() + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's tables")
    args = parser.parse_args()
    if args.readme:
        rewrite_readme()
    else:
        print(render())


if __name__ == "__main__":
    main()
