"""Loading of `rau_rt._native` (this is its only importer) and the native thread count.

`RAU_RT_NATIVE=0` forces the NumPy reference path; `RAU_RT_STRICT_NATIVE=1` makes a missing
extension an error instead of a fallback. Native kernels run on `num_threads()` OpenMP threads:
`set_num_threads`, else `RAU_RT_THREADS`, else the number of physical cores.

OpenMP threads wait passively (sleep) at the end of a kernel unless `OMP_WAIT_POLICY` says
otherwise: with libgomp's default spinning, a 2-thread kernel ran 3-17x slower than 1 thread when
another process held one of 2 cores (benchmarks/README.md), and on a tower the VLM worker is that
other process. The variable is set only while the extension loads (libgomp reads it then).
"""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType

from rau_rt.errors import InputError, NativeUnavailableError

_threads: int | None = None


@cache
def load_native() -> ModuleType | None:
    """The extension module, or None for the NumPy path (see the module docstring)."""
    if os.environ.get("RAU_RT_NATIVE", "1") == "0":
        return None
    added = "OMP_WAIT_POLICY" not in os.environ
    if added:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from rau_rt import _native
    except ImportError as exc:
        if os.environ.get("RAU_RT_STRICT_NATIVE") == "1":
            raise NativeUnavailableError(
                f"RAU_RT_STRICT_NATIVE=1 but rau_rt._native does not import ({exc}); "
                "reinstall with a C++17 compiler: pip install -e ."
            ) from exc
        return None
    finally:
        if added:
            os.environ.pop("OMP_WAIT_POLICY", None)
    return _native


def native_available() -> bool:
    """Whether ops run the compiled kernels (False: the NumPy reference path)."""
    return load_native() is not None


def native_info() -> dict[str, object]:
    """What the extension is: built or not, OpenMP or not, and the thread count ops will use."""
    native = load_native()
    if native is None:
        return {"built": False, "openmp": False, "threads": 1, "path": None}
    return {
        "built": True,
        "openmp": bool(native.has_openmp()),
        "threads": num_threads() if native.has_openmp() else 1,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE (rau-rt default)"),
        "path": native.__file__,
    }


def physical_cores() -> int:
    """Physical cores available to this process (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def set_num_threads(threads: int | None) -> None:
    """Threads for native kernels; None restores the default (RAU_RT_THREADS or physical cores)."""
    global _threads
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise InputError(f"threads: expected an integer >= 1 or None, got {threads!r}")
    _threads = threads


def num_threads() -> int:
    """Threads the native kernels use on the next call."""
    if _threads is not None:
        return _threads
    env = os.environ.get("RAU_RT_THREADS")
    if env is None or env == "":
        return physical_cores()
    try:
        value = int(env)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"RAU_RT_THREADS: expected an integer >= 1, got {env!r}")
    return value
