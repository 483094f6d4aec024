"""Build script: one installed namespace (`rau_rt`) from four folders, plus the native extension.

`rau_rt/` is the runtime, `engines/` installs as `rau_rt.engines`, `export/` as `rau_rt.export`
and `train/` as `rau_rt.train` (ARCHITECTURE.md, "Layout"). The pybind11 extension
`rau_rt._native` is optional so that a host without a C++ toolchain still gets the NumPy path;
`RAU_RT_STRICT_NATIVE=1` (set by CI) turns a failed native build into a failed install.
"""

import os
import re
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent.resolve()
STRICT_NATIVE = os.environ.get("RAU_RT_STRICT_NATIVE", "") == "1"
# installed name -> source folder (ARCHITECTURE.md, "Layout")
PACKAGE_ROOTS = {"rau_rt": "rau_rt", "rau_rt.engines": "engines", "rau_rt.export": "export",
                 "rau_rt.train": "train"}


def read_version() -> str:
    text = (ROOT / "rau_rt" / "_version.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("rau_rt/_version.py must define __version__ = \"X.Y.Z\"")
    return match.group(1)


def openmp_flags() -> tuple[list[str], list[str]]:
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        # Apple clang has no bundled OpenMP; the kernels run single-threaded there.
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def native_extension() -> Pybind11Extension:
    compile_omp, link_omp = openmp_flags()
    # -march is left to the toolchain default so a wheel built here runs on any x86-64/aarch64
    # box; RAU_RT_NATIVE_ARCH=native tunes the build to the machine that compiles it.
    arch = os.environ.get("RAU_RT_NATIVE_ARCH", "")
    arch_flags = [f"-march={arch}"] if arch and sys.platform != "win32" else []
    # No FMA contraction: the kernels must round exactly like their NumPy references (parity
    # tests compare them), whatever -march enables.
    opt_flags = ["/O2", "/fp:precise"] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]
    return Pybind11Extension(
        "rau_rt._native",
        sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "native").rglob("*.cpp")),
        include_dirs=["native/include"],
        cxx_std=17,
        extra_compile_args=opt_flags + arch_flags + compile_omp,
        extra_link_args=link_omp,
        optional=not STRICT_NATIVE,
    )


def package_layout() -> tuple[dict[str, str], list[str]]:
    """Every folder with an `__init__.py` under the source roots, named in `rau_rt`."""
    package_dir: dict[str, str] = {}
    packages: list[str] = []
    for name, folder in PACKAGE_ROOTS.items():
        package_dir[name] = folder
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            packages.append(".".join([name, *rel.parts]))
    return package_dir, packages


PACKAGE_DIR, PACKAGES = package_layout()

setup(
    version=read_version(),
    package_dir=PACKAGE_DIR,
    packages=PACKAGES,
    # the demo models' weights and training records (rau-rt train; README "Demo models")
    package_data={"rau_rt": ["weights/*.safetensors", "weights/*.json"]},
    ext_modules=[native_extension()],
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
