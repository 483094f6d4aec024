"""`rau-rt serve-localizer`: a VLM bundle's localizer behind Triton Inference Server (PyTriton).

PyTriton starts its bundled `tritonserver` (HTTP, gRPC and metrics on the given ports, KServe
v2 protocol) and forwards each request to this process, where `LocalizerService` answers it.
One model, `rau_localizer`, registers references (a reference in, its id out) and answers
locate queries (a reference id and a frame in, boxes, answer text and timings out);
`rau_rt.localization.wire` is its format.

PyTriton 0.7 wants numpy < 2, while the runtime keeps numpy 2 and OpenCV 5, so the server
runs from its own virtual environment (`rau-rt serve-localizer --make-env DIR`,
`rau_rt.serving.environment`); run from the runtime's environment, the command re-executes
itself there. This module is its entry point there: `python -m rau_rt.serving.server`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rau_rt.errors import InputError
from rau_rt.localization import wire
from rau_rt.localization.localizer import LocalizerConfig
from rau_rt.serving.service import LocalizerService, ServiceConfig

LOG = logging.getLogger("rau_rt.serving")
# Requests handed to the service at once. The decode loop answers one request at a time, so a
# batch only makes its requests wait for each other: measured with the demo VLM and 8 streams
# (benchmarks/results/serving_cpu.json), batches of 8 gave 15.9 answers/s, p99 732 ms and the
# least served stream 88 % of the most served one's answers; batches of 1 16.9/s, 601 ms, 98 %.
# With 1, Triton's FIFO queue is fair by itself: each tower stream has at most one request in
# flight (LocalizerWorker).
DEFAULT_MAX_BATCH = 1
# With --max-batch > 1, Triton's dynamic batcher waits this long (µs) for more requests to
# hand over together, and the service serves them round-robin by stream.
QUEUE_DELAY_US = 2000
READY_LINE = "rau-rt localizer ready"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options (shared by `rau-rt serve-localizer` and this module's main)."""
    parser.add_argument("--bundle", default=None,
                        help="a VLM bundle, or a pipeline bundle with a vlm/ part (required)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback; another needs --allow-remote)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (KServe v2)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback --host: the server has no authentication, "
                             "bind it only on a network you trust")
    parser.add_argument("--max-references", type=int, default=ServiceConfig.max_references,
                        help="references kept, least recently used evicted beyond")
    parser.add_argument("--max-cache-mb", type=float, default=ServiceConfig.max_cache_mb,
                        help="bound on the kept references' prefix KV caches together")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="requests handed over at once (default 1: the decode loop answers "
                        "one at a time, see README 'Central localizer')")
    parser.add_argument("--workspace", default=None,
                        help="PyTriton's working folder (its tritonserver copy and model "
                        "store; default a new one under ~/.cache/pytriton, removed on stop)")
    parser.add_argument("--backend", default=None, help="engine backend of the VLM graphs")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the VLM graphs (default: the backend's)")


def check_bind(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless asked for explicitly."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise InputError(f"--host {host!r}: expected an IP address or localhost") from None
    if not loopback and not allow_remote:
        raise InputError(f"--host {host}: not a loopback address; the localizer server has no "
                         "authentication, so binding it to a network needs --allow-remote")
    if not loopback:
        LOG.warning("serving on %s: reachable from the network, without authentication", host)


def bind_models(triton, service: LocalizerService, max_batch: int) -> None:
    """Bind `service` as the localizer model on a `pytriton.triton.Triton`."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    inputs = [Tensor(name="request", dtype=bytes, shape=(1,)),
              Tensor(name="data", dtype=np.uint8, shape=(-1,))]
    outputs = [Tensor(name="response", dtype=bytes, shape=(1,))]

    def infer(requests):
        return [_response(a) for a in service.answer(
            [(r["request"], r["data"].reshape(-1)) for r in requests])]

    if max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {max_batch}")
    batcher = (DynamicBatcher(max_queue_delay_microseconds=QUEUE_DELAY_US) if max_batch > 1
               else None)
    triton.bind(wire.MODEL, infer, inputs, outputs,
                config=ModelConfig(max_batch_size=max_batch, batcher=batcher))


def load_vlm(bundle: str | os.PathLike, backend: str | None = None, engine=None):
    """`(loaded bundle, its folder)` of a VLM bundle or a pipeline bundle's vlm/ part."""
    from rau_rt.bundle import load_bundle
    from rau_rt.config import EngineConfig
    from rau_rt.pipeline.factory import VLM_PART

    folder = Path(bundle)
    if (folder / VLM_PART).is_dir():
        folder = folder / VLM_PART
    return load_bundle(folder, backend, engine or EngineConfig()), folder


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _response(payload) -> dict[str, np.ndarray]:
    return {"response": wire.encode_response(payload).reshape(1, 1)}


def serve(args: argparse.Namespace) -> None:
    """Load the bundle and serve until interrupted."""
    if args.bundle is None:
        raise InputError("--bundle is required (a VLM bundle or a pipeline bundle with vlm/)")
    check_bind(args.host, args.allow_remote)
    # the Python-backend stub must load this interpreter's libpython, not the system's
    # (a mismatch crashes the stub: notes/data_and_scale.md)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError as exc:
        raise InputError(f"PyTriton is not importable in {sys.executable} ({exc}); create the "
                         "server environment with `rau-rt serve-localizer --make-env "
                         ".venv-server`") from None
    from rau_rt.config import EngineConfig

    engine = EngineConfig() if args.threads is None else EngineConfig(intra_op_threads=args.threads)
    bundle, folder = load_vlm(args.bundle, args.backend, engine)
    service = LocalizerService(bundle, ServiceConfig(args.max_references, args.max_cache_mb,
                                                     LocalizerConfig()))
    config = TritonConfig(http_address=args.host, http_port=args.port,
                          grpc_address=args.host, grpc_port=args.grpc_port,
                          metrics_address=args.host, metrics_port=args.metrics_port,
                          log_verbose=0)
    # SIGTERM (a service manager's stop) ends like Ctrl-C: PyTriton then stops its
    # tritonserver, which a plain exit would leave running on the ports
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Triton(config=config, workspace=args.workspace) as triton:
            bind_models(triton, service, args.max_batch)
            triton.connect()
            print(f"{READY_LINE}: http://{args.host}:{args.port} grpc {args.host}:"
                  f"{args.grpc_port}, bundle {folder}", flush=True)
            triton.serve()
    finally:
        bundle.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rau_rt.serving.server",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        serve(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
