"""The dependency direction of ARCHITECTURE.md ("Rules", 3 and 4), checked on the source's imports.

Every module is classified into a layer; a module the table does not know fails the test, so a
new module must be placed deliberately.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed package -> source folder (setup.py PACKAGE_ROOTS)
SOURCE_ROOTS = {"rau_rt": "rau_rt", "rau_rt.engines": "engines", "rau_rt.export": "export",
                "rau_rt.train": "train"}

# module prefix -> layer; the longest matching prefix wins
LAYER_OF = {
    "rau_rt._native": "native",
    "rau_rt._version": "core",
    "rau_rt.errors": "core",
    "rau_rt.types": "core",
    "rau_rt.config": "core",
    "rau_rt.geometry": "core",
    "rau_rt.ops": "core",
    "rau_rt.profiling": "core",
    # the exported VLM's contract (vlm.json) and its numpy preprocessing/M-RoPE ports: core, so
    # that export writes it and localization reads it
    "rau_rt.vlm_layout": "core",
    # the exported SAM2's token-selection settings (sam2.json): written by export, read by tracking
    "rau_rt.sam2_layout": "core",
    "rau_rt.sidecar": "core",  # the JSON files beside a bundle's graphs
    # the one greedy decode loop over the VLM graphs: the localizer answers with it and the
    # exporter verifies it, so it sits below both
    "rau_rt.vlm_decoding": "core",
    "rau_rt.engines": "engines",
    "rau_rt.bundle": "bundle",
    "rau_rt.tracking": "domain",
    "rau_rt.localization": "domain",
    "rau_rt.reference": "domain",
    "rau_rt.pipeline": "pipeline",
    # the central localizer server: the localizer behind Triton, wired by the cli
    "rau_rt.serving": "serving",
    "rau_rt.io": "io",
    "rau_rt.synthetic": "synthetic",
    "rau_rt.export": "export",
    # training of the demo models: torch side, beside export; it builds the models through
    # export, draws its data from synthetic and prompts the VLM through localization
    "rau_rt.train": "train",
    "rau_rt.cli": "cli",
    "rau_rt.commands": "cli",  # run, demo, bench: wire io, pipeline and (demo) export
    "rau_rt.doctor": "cli",
    "rau_rt.__main__": "cli",
}
FACADE = "rau_rt"  # rau_rt/__init__.py, the public API; matched exactly, not as a prefix

# layer -> layers it may import (each layer only those below it; synthetic on core only, io on
# core and synthetic;
# export on core, engines, bundle; only cli imports export).
MAY_IMPORT = {
    "native": set(),
    "core": {"native", "core"},
    "engines": {"core", "engines"},
    "bundle": {"core", "engines", "bundle"},
    "domain": {"core", "engines", "bundle", "domain"},
    "pipeline": {"core", "engines", "bundle", "domain", "pipeline"},
    "serving": {"core", "engines", "bundle", "domain", "pipeline", "serving"},
    # io reads the synthetic generator's cines like any file (synthetic: URIs); synthetic does
    # not import io
    "io": {"core", "io", "synthetic"},
    "synthetic": {"core", "synthetic"},
    "export": {"core", "engines", "bundle", "export"},
    # train builds the localizer's training prompts with the localizer's own prompt code
    # (domain), so that it trains on exactly what the runtime sends
    "train": {"core", "io", "synthetic", "domain", "export", "train"},
    "facade": {"native", "core", "engines", "bundle", "domain", "pipeline", "io", "synthetic"},
    "cli": {"native", "core", "engines", "bundle", "domain", "pipeline", "serving", "io",
            "synthetic", "export", "train", "cli", "facade"},
}

# Engine modules that are not backends: a backend may import only these of its siblings.
ENGINE_SHARED = {"rau_rt.engines", "rau_rt.engines.base"}

# Frameworks that only lazy (function-level) imports may load: `import rau_rt` and the runtime
# path must work without them. Export stage modules are the exception (never imported by the
# runtime; their package __init__ and __main__ are not).
HEAVY = {"torch", "torchvision", "onnxruntime", "tensorrt", "transformers", "sam2", "onnx",
         "onnxscript", "tritonclient", "pytriton", "cuda", "pycuda", "onnxruntime_genai"}


def layer_of(module: str) -> str | None:
    if module == FACADE:
        return "facade"
    best = None
    for prefix in LAYER_OF:
        if (module == prefix or module.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best)
        ):
            best = prefix
    return LAYER_OF[best] if best is not None else None


def source_modules() -> dict[str, Path]:
    """Installed module name -> source file, for every .py under the three source roots."""
    modules = {}
    for package, folder in SOURCE_ROOTS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree: ast.Module, module: str, is_package: bool, known: set[str]):
    """(imported module, line, module_level) for every import in the file."""
    found = []

    def visit(node: ast.AST, in_function: bool, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            tc = in_type_checking or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, child.lineno, not (func or tc)))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, is_package, child)
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in known else target, child.lineno, not (func or tc)))
            visit(child, func, tc)

    visit(tree, False, False)
    return found


def violations(module: str, source: str, is_package: bool, known: set[str]) -> list[str]:
    """Every rule the file breaks, as readable lines."""
    problems = []
    layer = layer_of(module)
    if layer is None:
        return [f"{module}: not classified in tests/test_layering.py LAYER_OF"]
    for target, line, module_level in _imports(ast.parse(source), module, is_package, known):
        top = target.split(".")[0]
        if top in HEAVY and module_level:
            exempt = layer in ("export", "train") and module not in (
                "rau_rt.export", "rau_rt.export.__main__", "rau_rt.train")
            if not exempt:
                problems.append(f"{module}:{line} imports {target} at module level (import it "
                                f"lazily inside the function that needs it)")
        if top != "rau_rt":
            continue
        target_layer = layer_of(target)
        if target_layer is None:
            problems.append(f"{module}:{line} imports unclassified {target}")
        elif target_layer not in MAY_IMPORT[layer]:
            problems.append(f"{module}:{line} ({layer}) may not import {target} ({target_layer})")
        elif (layer == "engines" and target_layer == "engines" and module not in ENGINE_SHARED
              and module != "rau_rt.engines.registry" and target not in ENGINE_SHARED
              and target != module):
            problems.append(f"{module}:{line}: an engine may not import another engine ({target})")
    return problems


def test_source_tree_follows_the_dependency_rules():
    modules = source_modules()
    assert "rau_rt.ops" in modules and "rau_rt.engines" in modules and "rau_rt.export" in modules
    known = set(modules) | {"rau_rt._native"}
    problems = []
    for module, path in modules.items():
        problems += violations(module, path.read_text(), _is_package(path), known)
    assert problems == [], "\n".join(problems)


KNOWN = {"rau_rt", "rau_rt.ops", "rau_rt.errors", "rau_rt.pipeline", "rau_rt.cli",
         "rau_rt.engines", "rau_rt.engines.base", "rau_rt.engines.tensorrt",
         "rau_rt.engines.onnxruntime", "rau_rt.export", "rau_rt.export.sam2", "rau_rt.io",
         "rau_rt.io.sources", "rau_rt._native"}


@pytest.mark.parametrize(
    ("module", "source", "is_package"),
    [
        ("rau_rt.ops", "from rau_rt.pipeline import Pipeline", False),  # core -> pipeline
        ("rau_rt.ops", "from rau_rt import cli", False),  # core -> cli
        ("rau_rt.ops", "from . import pipeline", False),  # relative import, resolved
        ("rau_rt.ops", "import torch", False),  # heavy framework at module level
        ("rau_rt.ops", "try:\n    import onnxruntime\nexcept ImportError:\n    pass", False),
        ("rau_rt.io.sources", "from rau_rt.engines import base", False),  # io sits on core only
        ("rau_rt.engines.tensorrt", "from rau_rt.engines.onnxruntime import OrtEngine", False),
        ("rau_rt.engines.tensorrt", "from rau_rt.export import sam2", False),
        ("rau_rt.pipeline", "import rau_rt.export.sam2", False),  # only cli imports export
        ("rau_rt.export", "import torch", True),  # export/__init__ stays light
        ("rau_rt.newmodule", "import numpy", False),  # unclassified module
    ],
)
def test_checker_rejects_forbidden_imports(module, source, is_package):
    assert violations(module, source, is_package, KNOWN) != []


@pytest.mark.parametrize(
    ("module", "source", "is_package"),
    [
        ("rau_rt.ops", "from rau_rt.errors import InputError\nfrom rau_rt import _native", False),
        ("rau_rt.ops", "def f():\n    import torch", False),  # lazy import
        ("rau_rt.ops", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch",
         False),
        ("rau_rt.engines.tensorrt", "from rau_rt.engines.base import Engine", False),
        ("rau_rt.export.sam2", "import torch\nfrom rau_rt.engines import base", False),
        ("rau_rt.cli", "def f():\n    from rau_rt.export import sam2", False),
        ("rau_rt.pipeline", "from .ops import preprocess", False),
    ],
)
def test_checker_accepts_allowed_imports(module, source, is_package):
    assert violations(module, source, is_package, KNOWN) == []
