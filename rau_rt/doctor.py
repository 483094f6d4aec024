"""`rau-rt doctor`: what this host can run, one row per component.

Each probe imports its library lazily and reports a missing or broken component as a row; a probe
never raises. Used by `rau_rt.cli` only (it is the one module that imports heavy frameworks on
purpose, to report their versions).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rau_rt import ops
from rau_rt._version import __version__

OK, MISSING, WARN, ERROR = "ok", "missing", "warn", "error"

# CPU features that change which kernels and quantized paths are fast (/proc/cpuinfo names).
CPU_FLAGS_X86 = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                 "amx_tile", "amx_int8", "amx_bf16")
CPU_FLAGS_ARM = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")


@dataclass(frozen=True)
class Row:
    """One component: its status (ok, missing, warn, error), a human line and JSON fields."""

    component: str
    status: str
    detail: str
    data: dict[str, object] = field(default_factory=dict)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import(name: str):
    """Import `name`; None when it is not installed. Other failures propagate to `_guard`."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name or (exc.name and name.startswith(exc.name + ".")):
            return None
        raise


def probe_python() -> Row:
    version = platform.python_version()
    return Row("python", OK, f"{version} ({sys.executable})",
               {"version": version, "executable": sys.executable})


def probe_platform() -> Row:
    machine, system = platform.machine(), platform.system()
    data: dict[str, object] = {"system": system, "machine": machine, "release": platform.release()}
    detail = f"{system} {platform.release()} {machine}"
    tegra = Path("/etc/nv_tegra_release")
    if tegra.exists():
        data["jetson"] = tegra.read_text(errors="replace").splitlines()[0].strip("# ").strip()
        detail += f" (Jetson: {data['jetson']})"
    return Row("platform", OK, detail, data)


def probe_rau_rt() -> Row:
    return Row("rau-rt", OK, __version__, {"version": __version__})


def probe_numpy() -> Row:
    import numpy as np

    return Row("numpy", OK, np.__version__, {"version": np.__version__})


def probe_opencv() -> Row:
    cv2 = _import("cv2")
    if cv2 is None:
        return Row("opencv", MISSING, "not installed: pip install opencv-python-headless")
    data = {"version": cv2.__version__, "threads": cv2.getNumThreads()}
    gui = [d for d in ("opencv-python", "opencv-contrib-python") if _dist_version(d)]
    if gui:
        # The GUI builds need libGL, which towers and servers do not have.
        return Row("opencv", WARN, f"{cv2.__version__}; {', '.join(gui)} installed: prefer "
                   "opencv-python-headless (no libGL needed)", data | {"gui_build": gui})
    return Row("opencv", OK, f"{cv2.__version__} (threads {data['threads']})", data)


def probe_pillow() -> Row:
    pil = _import("PIL")
    if pil is None:
        return Row("pillow", MISSING, "not installed: pip install pillow")
    return Row("pillow", OK, pil.__version__, {"version": pil.__version__})


def probe_onnxruntime() -> Row:
    cpu, gpu = _dist_version("onnxruntime"), _dist_version("onnxruntime-gpu")
    ort = _import("onnxruntime")
    if ort is None:
        return Row("onnxruntime", MISSING, "not installed: pip install onnxruntime")
    providers = list(ort.get_available_providers())
    data = {"version": ort.__version__, "providers": providers, "device": ort.get_device(),
            "distributions": [d for d, v in (("onnxruntime", cpu), ("onnxruntime-gpu", gpu)) if v]}
    detail = f"{ort.__version__}; providers: {', '.join(providers)}"
    if cpu and gpu:
        # Both wheels install the same `onnxruntime` module; whichever came last half-overwrote
        # the other. README "GPU install" has the fix.
        return Row("onnxruntime", WARN, detail + "; both onnxruntime and onnxruntime-gpu are "
                   "installed: pip uninstall -y onnxruntime onnxruntime-gpu && "
                   "pip install onnxruntime-gpu", data)
    return Row("onnxruntime", OK, detail, data)


def probe_torch() -> Row:
    torch = _import("torch")
    if torch is None:
        return Row("torch", MISSING, "not installed (export/parity only): pip install '.[export]'")
    cuda = bool(torch.cuda.is_available())
    data = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
            "devices": torch.cuda.device_count() if cuda else 0}
    detail = f"{torch.__version__}; CUDA build {torch.version.cuda or 'none'}; "
    detail += f"{data['devices']} CUDA device(s)" if cuda else "no CUDA device"
    return Row("torch", OK, detail, data)


def probe_tensorrt() -> Row:
    trt = _import("tensorrt")
    if trt is None:
        return Row("tensorrt", MISSING,
                   "not importable (GPU hosts: pip install '.[gpu]' or JetPack)")
    return Row("tensorrt", OK, trt.__version__, {"version": trt.__version__})


def _gpus_from_torch() -> list[dict[str, object]] | None:
    if "torch" not in sys.modules:  # probe_torch ran first; do not import torch twice for this
        return None
    torch = sys.modules["torch"]
    if not torch.cuda.is_available():
        return None
    gpus = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        gpus.append({"index": index, "name": torch.cuda.get_device_name(index),
                     "compute_capability": f"{major}.{minor}",
                     "memory_gib": round(torch.cuda.get_device_properties(index).total_memory
                                         / 2**30, 1)})
    return gpus


def _gpus_from_nvidia_smi() -> list[dict[str, object]] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    result = subprocess.run(
        [smi, "--query-gpu=index,name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=20, check=False)
    if result.returncode != 0:
        return None
    gpus = []
    for line in result.stdout.strip().splitlines():
        index, name, cap, memory = (part.strip() for part in line.split(","))
        gpus.append({"index": int(index), "name": name, "compute_capability": cap,
                     "memory_gib": round(float(memory) / 1024, 1)})
    return gpus


def probe_gpu() -> Row:
    gpus = _gpus_from_torch()
    source = "torch"
    if gpus is None:
        gpus, source = _gpus_from_nvidia_smi(), "nvidia-smi"
    if not gpus:
        return Row("gpu", MISSING, "no CUDA GPU found (torch.cuda, nvidia-smi)", {"gpus": []})
    detail = "; ".join(f"{g['index']}: {g['name']} (sm {g['compute_capability']}, "
                       f"{g['memory_gib']} GiB)" for g in gpus)
    return Row("gpu", OK, f"{detail} [{source}]", {"gpus": gpus, "source": source})


def probe_native() -> Row:
    info = ops.native_info()
    if not info["built"]:
        return Row("native", MISSING, "rau_rt._native not built: ops use the NumPy reference "
                   "(reinstall with a C++17 compiler: pip install -e .)", info)
    detail = f"built, OpenMP {'on' if info['openmp'] else 'off'}, {info['threads']} thread(s)"
    return Row("native", OK, detail, info)


def _cpu_info() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def probe_cpu() -> Row:
    model, flags = _cpu_info()
    wanted = CPU_FLAGS_ARM if platform.machine() in ("aarch64", "arm64") else CPU_FLAGS_X86
    present = {flag: flag in flags for flag in wanted}
    data = {"model": model, "physical_cores": ops.physical_cores(),
            "logical_cpus": os.cpu_count(), "flags": present}
    have = [flag for flag, on in present.items() if on]
    detail = (f"{model}; {data['physical_cores']} cores / {data['logical_cpus']} CPUs; "
              f"{' '.join(have) or 'none of ' + ' '.join(wanted)}")
    return Row("cpu", OK, detail, data)


def probe_serving() -> Row:
    """The central localizer: its client here, and the server's environment (or PyTriton)."""
    from rau_rt.serving import environment

    client = _dist_version("tritonclient")
    pytriton = _dist_version("nvidia-pytriton")
    env = environment.find_env(None)
    data = {"tritonclient": client, "pytriton_here": pytriton,
            "server_env": None if env is None else str(env)}
    server = (f"server PyTriton {pytriton} here" if pytriton else
              f"server environment {env}" if env is not None else
              "no server environment (rau-rt serve-localizer --make-env .venv-server)")
    if client is None:
        return Row("localizer-server", MISSING, f"no tritonclient: pip install '.[remote]'; "
                   f"{server}", data)
    return Row("localizer-server", OK, f"client tritonclient {client}; {server}", data)


PROBES: tuple[Callable[[], Row], ...] = (
    probe_rau_rt, probe_python, probe_platform, probe_cpu, probe_native, probe_numpy,
    probe_opencv, probe_pillow, probe_onnxruntime, probe_torch, probe_tensorrt, probe_gpu,
    probe_serving,
)


def _guard(probe: Callable[[], Row]) -> Row:
    try:
        return probe()
    except Exception as exc:  # a broken install is a row, not a crash
        name = probe.__name__.removeprefix("probe_")
        return Row(name, ERROR, f"{type(exc).__name__}: {exc}", {"error": repr(exc)})


def collect() -> list[Row]:
    """Run every probe; never raises."""
    return [_guard(probe) for probe in PROBES]


def to_json(rows: list[Row]) -> dict[str, object]:
    """Machine-readable report: `native` (bool) and `components` keyed by component name."""
    components = {r.component: {"status": r.status, "detail": r.detail, **r.data} for r in rows}
    return {
        "rau_rt": __version__,
        "native": components.get("native", {}).get("status") == OK,
        "components": components,
    }


def to_table(rows: list[Row]) -> str:
    width = max(len(r.component) for r in rows)
    status_width = max(len(r.status) for r in rows)
    return "\n".join(
        f"{r.component:<{width}}  {r.status:<{status_width}}  {r.detail}" for r in rows)
