"""Engines on CPU: one conv + attention model through torch eager, AOTInductor and ONNX Runtime.

    python -m benchmarks.bench_engines [--quick] [--json PATH]

The model is exported with `rau_rt.export.graph.export_graph` (which verifies parity) and every
backend runs through the same `Engine.run` API, NumPy in and out. One more row runs the same
ONNX graph in a plain ONNX Runtime session with all of ORT's own fusions
(`onnxruntime-skip-layernorm`): what rau-rt's CPU sessions ran before they skipped
SkipLayerNormFusion (engines/onnxruntime.py), so the record says what skipping it gains.
Backends take turns of `TURN` timed calls so that the VM's drift (+-25 % between runs on the
2-core box, notes/feasibility.md) hits all of them alike; ratios are against eager from the
same run. The first call of every turn is not timed: ONNX Runtime's pool threads keep
spinning for a while after a call and would slow whichever backend runs next
(benchmarks.harness, `settle`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.harness import case_record, run_suite, time_interleaved
from rau_rt.config import EngineConfig
from rau_rt.engines import registry
from rau_rt.export.graph import export_graph
from rau_rt.export.verify import compare
from rau_rt.types import TensorSpec

SUITE = "engines"
BASELINE = "torch-eager"
FUSED = "onnxruntime-skip-layernorm"  # ORT's default fusions, SkipLayerNormalization included


@dataclass(frozen=True)
class Size:
    """Model and loop size of one run."""

    image: int  # square input side, pixels
    dim: int  # token width
    blocks: int
    warmup: int
    iterations: int


# full: 512 px / patch 8 = 4096 tokens of width 128, 2 blocks: SAM2's 64x64 memory-attention
# grid, where attention dominates. quick: 1024 tokens of width 64, 1 block; under a minute on 2
# cores including the AOTInductor compile (~30 s).
SIZES = {"full": Size(512, 128, 2, 3, 40), "quick": Size(256, 64, 1, 3, 20)}
PATCH = 8
TURN = 5  # timed calls per backend turn


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, multi-head self-attention, GELU MLP."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ConvAttention(nn.Module):
    """Patch-embedding conv, transformer blocks, pooled head: a miniature image encoder."""

    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(blocks)])
        self.head = nn.Linear(dim, 16)

    def forward(self, image):
        tokens = self.embed(image).flatten(2).transpose(1, 2)
        tokens = self.blocks(tokens)
        return self.head(tokens.mean(dim=1)), tokens


def _plain_session(path: Path):
    """An ONNX Runtime CPU session with ORT's defaults (every fusion, SkipLayerNormalization
    included), threads as the engine's."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=["CPUExecutionProvider"])


def run(size: Size, workdir: Path) -> list[dict[str, object]]:
    """Export, load every backend, time the interleaved loop; one case per backend."""
    torch.manual_seed(0)
    model = ConvAttention(size.dim, size.blocks).eval()
    example = {"image": torch.randn(1, 3, size.image, size.image)}
    names = ["logits", "tokens"]
    entries = {backend: export_graph(model, example, workdir, "encoder", backend,
                                     output_names=names)
               for backend in ("aotinductor", "onnxruntime")}
    inputs = entries["onnxruntime"].inputs
    outputs = tuple(TensorSpec(s.name, s.shape, s.dtype) for s in entries["onnxruntime"].outputs)
    engines = {
        BASELINE: registry.backend_class("torch").from_module(model, inputs, outputs),
        "aotinductor": registry.open_engine(workdir / entries["aotinductor"].file),
        "onnxruntime": registry.open_engine(workdir / entries["onnxruntime"].file,
                                            config=EngineConfig(graph_optimization="all")),
    }
    feeds = {"image": example["image"].numpy()}
    fused = _plain_session(workdir / entries["onnxruntime"].file)
    results = {name: engine.run(feeds) for name, engine in engines.items()}
    results[FUSED] = dict(zip(names, fused.run(names, feeds), strict=True))
    calls = {name: (lambda e=engine: e.run(feeds)) for name, engine in engines.items()}
    calls[FUSED] = lambda: fused.run(names, feeds)
    samples = time_interleaved(calls, warmup=size.warmup, repeat=size.iterations, turn=TURN,
                               settle=1)
    for engine in engines.values():
        engine.close()
    case = f"conv_attention_{size.image}px_{(size.image // PATCH) ** 2}tok_d{size.dim}"
    cases = []
    for name in calls:
        parity = compare(results[BASELINE], results[name], "fp32")
        cases.append(case_record(
            case, name, "fp32", samples[name], BASELINE, samples[BASELINE],
            {"max_abs": max(o["max_abs"] for o in parity["outputs"].values()),
             "cosine": min(o["cosine"] for o in parity["outputs"].values())}))
    return cases


def main(argv: list[str] | None = None) -> int:
    def collect(args, workdir: Path) -> list:
        size = SIZES["quick" if args.quick else "full"]
        if args.repeat:
            size = dataclasses.replace(size, iterations=args.repeat)
        return run(size, workdir)

    return run_suite("bench_engines", __doc__, "benchmarks/results/engines_cpu.json", collect,
                     argv=argv, suite=SUITE,
                     device_extra=lambda: {"torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    sys.exit(main())
