"""Test tiers: `unit` (default for unmarked tests), `gpu` (skipped without a CUDA GPU), `slow`."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess

import pytest

TIER_MARKERS = ("unit", "gpu", "slow")


@functools.cache
def cuda_gpu_present() -> bool:
    """A CUDA GPU this process can use: torch's view when torch is installed, else nvidia-smi."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        return bool(torch.cuda.is_available())
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    return result.returncode == 0 and "GPU" in result.stdout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(m) for m in TIER_MARKERS):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("gpu") and not cuda_gpu_present():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; its CPU twin runs here"))


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory):
    """A random-init micro SAM2 bundle at 256 px, exported and loaded once for the whole run
    (an export takes about 50 s; four modules read it, none changes it)."""
    import contextlib
    import io

    from rau_rt.bundle import load_bundle
    from rau_rt.export import sam2
    from rau_rt.export.sam2.inputs import CheckFrames
    from rau_rt.export.sam2.model import ModelSource
    from rau_rt.synthetic import generate_sequence

    out = tmp_path_factory.mktemp("micro_bundle") / "bundle"
    with contextlib.redirect_stderr(io.StringIO()):
        sam2.export_sam2(sam2.Sam2ExportConfig(ModelSource(image_size=256, random_init="micro"),
                                               out),
                         CheckFrames.synthetic(generate_sequence, regions=2))
    with load_bundle(out) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`rau-rt demo` at a reduced size, run twice (the second reuses the cached bundle with
    keyframe localization on): its output folders, bundle and printed text. Once per run:
    exporting the shipped SAM2 takes about 50 s, and the CLI tests and the accuracy test
    (which reads the bundle's `sam2/`, the user's export of the shipped weights) share it;
    none changes it."""
    import contextlib
    import io

    from rau_rt.cli import main

    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", root / "cache"
    args = ["demo", "--out", str(out), "--cache", str(cache), "--frames", "8", "--size", "256",
            "--quiet"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(args) == 0
        first = stdout.getvalue()
        stdout.truncate(0)
        assert main([*args, "--localize", "on", "--out", str(root / "on")]) == 0  # cached
        second = stdout.getvalue()
    (bundle,) = [p for p in cache.iterdir() if p.name.startswith("demo-")]
    return {"out": out, "on": root / "on", "bundle": bundle, "first": first, "second": second}


def assert_profiles_are_consistent(directory) -> int:
    """Every manifest entry's dynamic ranges (the TensorRT profile): each dynamic input has
    one, min <= opt <= max per dimension, and the graph runs on ONNX Runtime at its `min` and
    at its `opt` shapes, so neither is a shape the graph cannot take (a decoder whose mask is
    shorter than its past plus its tokens). Returns how many entries were checked."""
    import numpy as np

    from rau_rt.bundle import read_manifest
    from rau_rt.engines import registry

    checked = 0
    for entry in read_manifest(directory).graphs:
        if entry.backend != "onnxruntime":
            continue
        ranges = entry.dynamic_ranges
        for spec in entry.inputs:
            if not spec.is_static:
                assert spec.name in ranges, f"{entry.file}: {spec.name} has no dynamic range"
        for name, bounds in ranges.items():
            low, opt, high = (np.asarray(bounds[k]) for k in ("min", "opt", "max"))
            assert (low <= opt).all() and (opt <= high).all(), (entry.file, name, bounds)
        with registry.open_engine(directory / entry.file, "onnxruntime",
                                  precision=entry.precision) as engine:
            for level in ("min", "opt"):
                feeds = {}
                for spec in engine.inputs:
                    shape = ranges[spec.name][level] if spec.name in ranges else spec.shape
                    fill = 1 if spec.name == "attention_mask" else 0
                    feeds[spec.name] = np.full(shape, fill, np.dtype(spec.dtype))
                engine.run(feeds)  # raises if the shapes contradict each other
        checked += 1
    return checked
