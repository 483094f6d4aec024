"""The localizer server's own virtual environment.

PyTriton 0.7.0 requires numpy < 2, while the runtime keeps numpy 2 and OpenCV 5 (its own
pins), so the server gets a second environment: PyTriton (which bundles tritonserver), the
runtime path's packages at versions that accept numpy 1.26, and this same rau-rt, installed
without dependencies from where the runtime's came from (the checkout, a wheel, or the
index). `rau-rt serve-localizer --make-env DIR` makes it; `rau-rt serve-localizer` finds it
(`--env`, else `RAU_RT_SERVER_ENV`, else `.venv-server` in the working folder) and runs the
server there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlsplit

from rau_rt._version import __version__
from rau_rt.errors import InputError

# Pins measured together on Python 3.11 (x86_64): PyTriton's numpy bound, and the newest
# OpenCV built against numpy 1 (OpenCV 4.12 and 5 need numpy 2).
REQUIREMENTS = (
    "nvidia-pytriton==0.7.0",
    "numpy==1.26.4",
    "onnxruntime==1.32.0",
    "opencv-python-headless==4.11.0.86",
    "pillow>=10",
    "tokenizers==0.23.3",
    "llguidance==1.9.1",
    "tqdm==4.70.1",
)
ENV_VARIABLE = "RAU_RT_SERVER_ENV"
DEFAULT_ENV = ".venv-server"


def rau_rt_source() -> list[str]:
    """pip arguments that install this rau-rt (without dependencies) into another environment:
    the checkout it was installed from (editable again if it was), the wheel, or the index."""
    try:
        direct = json.loads(metadata.distribution("rau-rt").read_text("direct_url.json") or "null")
    except metadata.PackageNotFoundError:
        direct = None
    if direct and str(direct.get("url", "")).startswith("file://"):
        path = unquote(urlsplit(direct["url"]).path)
        editable = bool(direct.get("dir_info", {}).get("editable"))
        return ["-e", path] if editable else [path]
    return [f"rau-rt=={__version__}"]


def env_python(env: str | Path) -> Path:
    return Path(env) / "bin" / "python"


def find_env(explicit: str | Path | None) -> Path | None:
    """The server environment to use: `explicit` (an `InputError` if it has no Python), else
    $RAU_RT_SERVER_ENV, else ./.venv-server; None if neither has a Python."""
    if explicit is not None:
        if not env_python(explicit).exists():
            raise InputError(f"--env {explicit}: no Python at {env_python(explicit)}; create "
                             f"it with `rau-rt serve-localizer --make-env {explicit}`")
        return Path(explicit)
    for candidate in (os.environ.get(ENV_VARIABLE), DEFAULT_ENV):
        if candidate and env_python(candidate).exists():
            return Path(candidate)
    return None


def make_env(env: str | Path, python: str = sys.executable) -> Path:
    """Create (or update) the server environment at `env`; returns its Python."""
    env = Path(env)
    if not env_python(env).exists():
        _run([python, "-m", "venv", str(env)])
    py = str(env_python(env))
    _run([py, "-m", "pip", "install", "--quiet", *REQUIREMENTS])
    _run([py, "-m", "pip", "install", "--quiet", "--no-deps", *rau_rt_source()])
    _run([py, "-c", "import pytriton, rau_rt.serving.server"])
    return Path(py)


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise InputError(f"making the server environment failed (exit {done.returncode}): "
                         f"{' '.join(command)}")
