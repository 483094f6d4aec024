"""`import rau_rt` (and the light subpackages) must not load a heavy framework (STYLE.md 8)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "onnxruntime", "tensorrt", "transformers", "sam2", "onnx", "tritonclient")


def loaded_modules(statement: str) -> set[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "statement",
    [
        "import rau_rt",
        "import rau_rt.engines, rau_rt.export",
        "import rau_rt.cli; rau_rt.cli.build_parser()",
    ],
)
def test_import_loads_no_heavy_framework(statement):
    modules = loaded_modules(statement)
    assert "rau_rt" in modules
    assert {m for m in modules if m.split(".")[0] in HEAVY} == set()


def test_purity_check_detects_a_heavy_import():
    # The guard itself must see a framework when one is imported (onnxruntime is a base dependency).
    assert "onnxruntime" in loaded_modules("import rau_rt, onnxruntime")
