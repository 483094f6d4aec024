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
