"""`ServerProcess`: a localizer server in a child process, for tests, benchmarks and scripts.

It runs `python -m rau_rt.serving.server` with the server environment's Python, in its own
process group (so that `kill` takes PyTriton's tritonserver along, as a crashed host would),
and returns from `start` when the server says it is ready.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from rau_rt.errors import RemoteError
from rau_rt.serving import environment
from rau_rt.serving.server import READY_LINE

LOG_LINES = 200  # the server output kept for error messages


def free_ports(count: int) -> list[int]:
    """`count` TCP ports free on loopback now."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class ServerProcess:
    """A loopback localizer server on free ports.

    Args:
        bundle: a VLM bundle or a pipeline bundle with vlm/.
        env: the server environment (with PyTriton).
        workspace: a folder for PyTriton's workspaces (one new sub-folder per start).
        options: further `serve-localizer` options, e.g. ["--max-batch", "1"].
    """

    def __init__(self, bundle: str | Path, env: str | Path, workspace: str | Path,
                 options: list[str] | None = None) -> None:
        self.bundle, self.env, self.workspace = Path(bundle), Path(env), Path(workspace)
        self.options = list(options or [])
        self.http, self.grpc, self.metrics = free_ports(3)
        self.process: subprocess.Popen | None = None
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.starts = 0

    @property
    def url(self) -> str:
        """The HTTP URL (`triton://`); `grpc_url` for gRPC."""
        return f"triton://127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"triton+grpc://127.0.0.1:{self.grpc}"

    def start(self, timeout_s: float = 120.0) -> None:
        """Start it (again, on the same ports) and wait until it serves."""
        self.starts += 1  # PyTriton wants a new workspace folder each time
        python = environment.env_python(self.env)
        self.process = subprocess.Popen(
            [str(python), "-m", "rau_rt.serving.server", "--bundle", str(self.bundle),
             "--port", str(self.http), "--grpc-port", str(self.grpc),
             "--metrics-port", str(self.metrics),
             "--workspace", str(self.workspace / f"run{self.starts}"), *self.options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        ready = threading.Event()

        def read(stream) -> None:
            for line in stream:
                self.log.append(line)
                if READY_LINE in line:  # tritonserver writes to the same pipe, unflushed
                    ready.set()

        threading.Thread(target=read, args=(self.process.stdout,), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RemoteError("the localizer server did not start:\n"
                                  + "".join(list(self.log)[-40:]))

    def kill(self) -> None:
        """SIGKILL the server's process group (a crash)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self._close()

    def stop(self) -> None:
        """SIGTERM (PyTriton stops its tritonserver), SIGKILL after a minute."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _close(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
