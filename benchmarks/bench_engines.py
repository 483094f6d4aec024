"""Engines on CPU: one conv + attention model through torch eager, AOTInductor and ONNX Runtime.

    python -m benchmarks.bench_engines [--quick] [--json PATH]

The model is exported with `rau_rt.export.torch.export_graph` (which verifies parity) and every
backend runs through the same `Engine.run` API, NumPy in and out. Backends take turns in rounds
of `ROUND` timed calls so that the VM's drift (+-25 % between runs on the 2-core box,
notes/feasibility.md) hits all of them alike; ratios are against eager from the same run. The
first call of every turn is not timed: ONNX Runtime's pool threads keep spinning for a while
after a call and would slow whichever backend runs next.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rau_rt.config import EngineConfig
from rau_rt.engines import registry
from rau_rt.export.torch import export_graph
from rau_rt.export.verify import compare
from rau_rt.types import TensorSpec

SUITE = "engines"
BASELINE = "torch-eager"


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
ROUND = 5  # timed calls per backend turn


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


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("rau-rt", "torch", "onnxruntime", "onnx", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _device() -> dict[str, object]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"kind": "cpu", "name": model, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": None}


def _stats(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "std_ms": float(a.std()), "tail_ms": float(a.max() - np.percentile(a, 95))}


def run(size: Size, workdir: Path) -> dict[str, object]:
    """Export, load every backend, time the interleaved loop; the JSON record."""
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
    results = {name: engine.run(feeds) for name, engine in engines.items()}
    for _ in range(size.warmup):
        for engine in engines.values():
            engine.run(feeds)
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(-(-size.iterations // ROUND)):
        for name, engine in engines.items():
            engine.run(feeds)  # untimed: lets the previous backend's threads go idle
            for _ in range(ROUND):
                start = time.perf_counter()
                engine.run(feeds)  # CPU engines return when outputs are ready: no sync needed
                samples[name].append((time.perf_counter() - start) * 1e3)
    for engine in engines.values():
        engine.close()
    stats = {name: _stats(s) for name, s in samples.items()}
    case = f"conv_attention_{size.image}px_{(size.image // PATCH) ** 2}tok_d{size.dim}"
    cases = []
    for name, stat in stats.items():
        parity = compare(results[BASELINE], results[name], "fp32")
        cases.append({
            "case": case, "backend": name, "precision": "fp32", **stat,
            "baseline": BASELINE, "baseline_median_ms": stats[BASELINE]["median_ms"],
            "speedup": stats[BASELINE]["median_ms"] / stat["median_ms"],
            "iterations": size.iterations,
            "fidelity": {"max_abs": max(o["max_abs"] for o in parity["outputs"].values()),
                         "cosine": min(o["cosine"] for o in parity["outputs"].values())}})
    return {"suite": SUITE, "device": _device(), "versions": _versions(), "cases": cases,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "command": "python -m benchmarks.bench_engines" + (
                " --quick" if size is SIZES["quick"] else "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced size (~1 min on 2 cores)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_engines_") as workdir:
        record = run(SIZES["quick" if args.quick else "full"], Path(workdir))
    print(f"{'backend':<14}{'median ms':>11}{'p90 ms':>9}{'vs eager':>10}  fidelity")
    for case in record["cases"]:
        print(f"{case['backend']:<14}{case['median_ms']:>11.2f}{case['p90_ms']:>9.2f}"
              f"{case['speedup']:>9.2f}x  cos {case['fidelity']['cosine']:.6f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
