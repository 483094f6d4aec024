"""`RemoteLocalizer`: the keyframe localizer of a central server (`rau-rt serve-localizer`).

It has what `LocalizerWorker` drives (`locate_result`, `cancel`), so a tower's pipeline runs
the same with a local VLM or a remote one; the tracker never waits for either. The client
registers its reference once (the server keeps the reference's prefix cache under a content
id), then sends frames with that id over Triton's KServe v2 protocol (tritonclient, HTTP or
gRPC). Failures are bounded and visible:

- every call has a network timeout, and a request carries its deadline: the server answers
  "stale" instead of running a request whose answer would come too late;
- a call that cannot reach the server is retried with exponential backoff; a server that
  answers "unknown reference" (it restarted, or evicted the reference) gets the reference
  registered again, and the query goes on;
- losing the server and getting it back are recorded (`health`), and the pipeline's summary
  carries them.

URLs: `triton://host:port` (HTTP, port 8000 by default) or `triton+grpc://host:port` (gRPC,
8001). tritonclient is imported when a client is built, never at module import.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from rau_rt.errors import InputError, RemoteError, ServerUnavailableError
from rau_rt.localization import wire
from rau_rt.localization.localizer import LocateResult
from rau_rt.reference import Reference
from rau_rt.types import Box, Frame

SCHEMES = {"triton": ("http", 8000), "triton+http": ("http", 8000),
           "triton+grpc": ("grpc", 8001)}
# the server's error types that mean "your input is wrong" (raised as InputError here, never
# retried); UnknownReference and Stale are handled; anything else is a RemoteError
_INPUT_ERRORS = {"InputError", "ShapeError", "AnnotationError"}
_OUTAGES_KEPT = 64  # the outage log is bounded like every statistics buffer on the live path


def is_remote(url: object) -> bool:
    """Whether `url` names a central localizer (a `triton://` URL)."""
    return isinstance(url, str) and urlsplit(url).scheme in SCHEMES


@dataclass(frozen=True)
class RemoteConfig:
    """Client settings.

    Attributes:
        timeout_s: network timeout of one call (connect and answer).
        deadline_s: a query's answer is useless after this long: the server drops a request
            still queued then (None: `timeout_s`).
        retries: further tries of a call that could not reach the server.
        backoff_s: wait before the first retry; doubled per retry up to `max_backoff_s`.
        max_backoff_s: longest wait between retries.
        stream: this stream's name on the server (fair queueing, logs); default a random id.
        channel_order: of bare (H, W, 3) arrays passed as frames.
    """

    timeout_s: float = 10.0
    deadline_s: float | None = None
    retries: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    stream: str = ""
    channel_order: str = "rgb"

    def __post_init__(self) -> None:
        for name in ("timeout_s", "backoff_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"RemoteConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise InputError(f"RemoteConfig.deadline_s must be > 0 or None, got "
                             f"{self.deadline_s}")
        if self.retries < 0:
            raise InputError(f"RemoteConfig.retries must be >= 0, got {self.retries}")


class RemoteLocalizer:
    """Boxes for a reference's regions from a central localizer server.

    Args:
        url: `triton://host:port` or `triton+grpc://host:port`.
        reference: the annotated reference (registered on the server here, and again
            whenever the server has lost it).
        config: client settings.

    Raises:
        InputError: a URL that is not a triton URL; a reference the server rejects.
        ServerUnavailableError: the server cannot be reached (after the retries).
        BackendUnavailableError: tritonclient is not installed.
    """

    def __init__(self, url: str, reference: Reference,
                 config: RemoteConfig = RemoteConfig()) -> None:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise InputError(f"localizer URL {url!r}: expected triton://host:port or "
                             "triton+grpc://host:port")
        self.protocol, default_port = SCHEMES[parts.scheme]
        self.address = f"{parts.hostname}:{parts.port or default_port}"
        self.url = url
        self.reference = reference
        self.config = config
        self.stream = config.stream or uuid.uuid4().hex[:12]
        self._module = _client_module(self.protocol)
        self._client = None
        self._client_thread: int | None = None  # the thread the client was made on
        self._reference_request = wire.encode_reference(reference)
        self.reference_id = wire.reference_id(*self._reference_request)
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self.registrations = 0
        self.lost = 0
        self.recovered = 0
        self._offline_since: float | None = None
        self.outages: list[dict[str, object]] = []  # {"lost_unix_s", "gap_s", "error"}
        self._register()

    @property
    def online(self) -> bool:
        """Whether the last call reached the server."""
        return self._offline_since is None

    def health(self) -> dict[str, object]:
        """The connection's record: registrations, outages (when, how long, why)."""
        with self._lock:
            return {"url": self.url, "stream": self.stream, "online": self.online,
                    "reference_id": self.reference_id, "registrations": self.registrations,
                    "lost": self.lost, "recovered": self.recovered,
                    "offline_since_unix_s": self._offline_since,
                    "outages": [dict(o) for o in self.outages]}

    def locate(self, frame: Frame | np.ndarray,
               regions: Sequence[str] | None = None) -> dict[str, Box | None]:
        """Region name -> box in frame pixels, or None (as `Localizer.locate`)."""
        return dict(self.locate_result(frame, regions).boxes)

    def locate_result(self, frame: Frame | np.ndarray,
                      regions: Sequence[str] | None = None) -> LocateResult:
        """`Localizer.locate_result` answered by the server; its timings are the server's
        stages plus "network" (round trip minus the server's work) and "total" (here)."""
        self._cancel = threading.Event()
        started = time.perf_counter()
        deadline = time.time() + (self.config.deadline_s or self.config.timeout_s)
        request = wire.encode_frame(frame, self.reference_id, regions, stream=self.stream,
                                    deadline_unix_s=deadline,
                                    channel_order=self.config.channel_order)
        for _ in range(2):  # a second pass after registering again
            payload = self._call(request)
            error = payload.get("error")
            if error is None:
                return self._result(payload, started)
            kind, message = str(error.get("type")), str(error.get("message"))
            if kind == "UnknownReference":
                self._register()
                continue
            if kind in _INPUT_ERRORS:
                raise InputError(f"{self.address}: {message}")
            raise RemoteError(f"{self.address}: {kind}: {message}")
        raise RemoteError(f"{self.address}: the reference was lost again right after it was "
                          "registered (the server's reference cache is too small?)")

    def cancel(self) -> None:
        """Stop retrying (from another thread, as the worker does for an overdue query); a call
        in flight ends at its network timeout."""
        self._cancel.set()

    def close(self) -> None:
        """Close the connection (made on this thread; another thread's is only dropped, since
        tritonclient's HTTP client lives on its thread's gevent hub)."""
        client, self._client = self._client, None
        if client is not None and self._client_thread == threading.get_ident():
            client.close()

    def _register(self) -> None:
        payload = self._call(self._reference_request)
        error = payload.get("error")
        if error is not None:
            message = f"{self.address}: registering {self.reference.name!r}: {error.get('message')}"
            raise (InputError if error.get("type") in _INPUT_ERRORS else RemoteError)(message)
        if payload.get("reference_id") != self.reference_id:
            raise RemoteError(f"{self.address}: the server registered the reference as "
                              f"{payload.get('reference_id')!r}, expected {self.reference_id} "
                              "(another rau-rt version?)")
        self.registrations += 1

    def _call(self, request: tuple[np.ndarray, np.ndarray]) -> dict[str, object]:
        """One inference call, retried with backoff while the server cannot be reached."""
        wait = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            try:
                if self._client is None or self._client_thread != threading.get_ident():
                    # registration runs on the caller's thread, queries on the worker's: the
                    # HTTP client cannot switch threads (gevent), so each thread gets its own
                    self.close()
                    self._client, self._client_thread = self._connect(), threading.get_ident()
                response = self._infer(request)
            except Exception as exc:  # tritonclient's, gevent's, grpc's and socket errors
                self._went_offline(exc)
                self.close()  # a fresh connection for the next try (the server may be new)
                if attempt == self.config.retries or self._cancel.wait(wait):
                    raise ServerUnavailableError(
                        f"localizer server {self.address} unreachable after {attempt + 1} "
                        f"tries: {type(exc).__name__}: {str(exc)[:300]}") from None
                wait = min(wait * 2, self.config.max_backoff_s)
                continue
            self._came_back()
            return response
        raise AssertionError("unreachable")

    def _connect(self):
        timeout = self.config.timeout_s
        if self.protocol == "http":
            return self._module.InferenceServerClient(self.address, connection_timeout=timeout,
                                                      network_timeout=timeout)
        return self._module.InferenceServerClient(self.address)

    def _infer(self, request: tuple[np.ndarray, np.ndarray]) -> dict[str, object]:
        header, data = request
        module = self._module
        inputs = [module.InferInput("request", [1, 1], "BYTES"),
                  module.InferInput("data", [1, int(data.size)], "UINT8")]
        inputs[0].set_data_from_numpy(header.reshape(1, 1))
        inputs[1].set_data_from_numpy(data.reshape(1, -1))
        outputs = [module.InferRequestedOutput("response")]
        if self.protocol == "http":
            result = self._client.infer(wire.MODEL, inputs, outputs=outputs)
        else:
            result = self._client.infer(wire.MODEL, inputs, outputs=outputs,
                                        client_timeout=self.config.timeout_s)
        return wire.decode_response(result.as_numpy("response"))

    def _result(self, payload: dict[str, object], started: float) -> LocateResult:
        total = (time.perf_counter() - started) * 1e3
        timings = {k: float(v) for k, v in dict(payload.get("timings_ms", {})).items()}
        server = dict(payload.get("server_ms", {}))
        timings["queue"] = float(server.get("waited", 0.0))
        server_total = timings.get("total", 0.0) + timings["queue"]
        timings["network"] = max(total - server_total, 0.0)
        timings["total"] = total
        return wire.result_from_payload(payload, timings)

    def _went_offline(self, exc: BaseException) -> None:
        with self._lock:
            if self._offline_since is None:
                self._offline_since = time.time()
                self.lost += 1
                self.outages.append({"lost_unix_s": self._offline_since, "gap_s": None,
                                     "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                del self.outages[:-_OUTAGES_KEPT]

    def _came_back(self) -> None:
        with self._lock:
            if self._offline_since is not None:
                gap = time.time() - self._offline_since
                self._offline_since = None
                self.recovered += 1
                if self.outages:
                    self.outages[-1]["gap_s"] = gap


def _client_module(protocol: str):
    from rau_rt.errors import BackendUnavailableError

    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as exc:
        raise BackendUnavailableError(
            f"tritonclient ({protocol}) is not importable ({exc}): "
            "pip install 'tritonclient[http,grpc]==2.73.0'") from None
    return module
