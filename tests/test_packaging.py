"""The wheel installs one `rau_rt` namespace from four folders, with the native extension and
the demo weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 "*.so", ".pytest_cache", ".ruff_cache", ".hypothesis")


def test_wheel_maps_engines_and_export_into_rau_rt(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(source)],
        check=True, env={**os.environ, "RAU_RT_STRICT_NATIVE": "1"}, capture_output=True,
    )
    (wheel,) = wheels.glob("rau_rt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("rau_rt/__init__.py", "rau_rt/ops/__init__.py", "rau_rt/engines/__init__.py",
                     "rau_rt/export/__init__.py", "rau_rt/train/__init__.py",
                     "rau_rt/weights/sam2_micro256.safetensors",
                     "rau_rt/weights/sam2_micro256.json"):
        assert expected in names
    assert any(n.startswith("rau_rt/_native.") and n.endswith((".so", ".pyd")) for n in names)
    tops = {n.split("/")[0] for n in names if not n.startswith("rau_rt-")}
    assert tops == {"rau_rt"}  # no stray engines/, export/, tests/ or benchmarks/ packages
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rau-rt = rau_rt.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # Import the unpacked wheel (not the source tree) and check where each piece comes from.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import rau_rt, rau_rt.engines, rau_rt.export, rau_rt._native\n"
            "print(rau_rt.engines.__file__); print(rau_rt.export.__file__);"
            " print(rau_rt._native.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    for line in out.stdout.split():
        assert Path(line).is_relative_to(site), line
