"""Training outputs written so that a stop at any moment leaves a usable set: atomic files,
the training record (what produced the weights) and the curve."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

from rau_rt._version import __version__
from rau_rt.io.plots import training_curve
from rau_rt.profiling import cpu_model, package_version

RECORD_PACKAGES = ("torch", "sam2", "transformers", "numpy", "opencv-python-headless")
# the demo weights' licence, written into every record
LICENCE = ("Apache-2.0, as rau-rt: trained by the project from random initialisation on its own "
           "synthetic angiography; no third-party weights or data")


def save_atomic(obj: object, path: Path) -> None:
    """torch.save to `path` through a `.partial` file renamed into place."""
    import torch

    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def save_fp16_safetensors(state: dict, path: Path, metadata: dict[str, str]) -> str:
    """A state dict as fp16 safetensors (floating tensors halved), atomically; its sha256."""
    import hashlib

    from safetensors.torch import save_file

    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    partial = path.with_name(path.name + ".partial")
    save_file(half, partial, metadata=metadata)
    partial.chmod(0o644)  # safetensors writes 0600; the file ships and installs world-readable
    os.replace(partial, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def init_record(path: str | None, fresh: list[str] = ()) -> dict[str, object] | None:
    """What a fine-tune started from: the file, its sha256 and, where the run folder or the
    shipped weights keep one beside it, that run's record (so shipped weights carry their
    whole lineage); after a partial init, the modules whose tensors started random."""
    if path is None:
        return None
    import hashlib

    file = Path(path)
    parent = next((p for p in (file.parent / "record.json", file.with_suffix(".json"))
                   if p.is_file()), None)
    record = {"file": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
              "record": json.loads(parent.read_text()) if parent else None}
    if fresh:
        record["fresh"] = sorted({".".join(name.split(".")[:3]) for name in fresh})
    return record


def write_json_atomic(path: Path, data: object) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def git_commit() -> str | None:
    """The checkout's commit (with "-dirty" when it has changes), None outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def training_record(model: str, command: str, config: dict, step: int, seeds: tuple[int, int],
                    wall_s: float, validation: list[dict[str, float]],
                    last_loss: float | None, seeds_key: str = "clip_seeds",
                    ) -> dict[str, object]:
    """The record that ships beside the weights; `seeds` are the first and last generator
    seeds the examples were drawn from (`seeds_key` names them: clips, pairs)."""
    return {
        "model": model, "command": command, "config": config, "steps_done": step,
        seeds_key: list(seeds), "wall_s": round(wall_s, 1),
        "last_loss": last_loss, "validation": validation,
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {"rau-rt": __version__,
                     **{name: package_version(name) for name in RECORD_PACKAGES}},
        "git_commit": git_commit(),
    }


def write_curve(path: Path, steps: list[int], losses: list[float],
                validation: list[dict[str, float]]) -> None:
    if steps:
        training_curve(path, steps, losses, validation)
