"""`LocalizerService`: what the central localizer does with a request, Triton aside.

The PyTriton server (`rau_rt.serving.server`) and the generated Triton model repository
(`rau_rt.serving.repository`) both hand their requests to this class, so the two serve the
same code, and the tests drive it directly as well as through a real server.

- References are registered once: the service builds a `Localizer` for it (vision features
  of the reference and its annotated copy, the prompt prefix's KV cache) and keeps it under
  the reference's content id in an LRU bounded by count and by KV-cache bytes.
- Locate requests arrive in batches (Triton's dynamic batcher hands over what queued up). The
  VLM's decode loop runs one answer at a time: the decoder graph is exported for batch 1 and
  every reference has its own prefix cache of its own length, so there is no tensor batching
  to gain; a batch is served one request after another in round-robin order of the streams
  in it (each tower stream has at most one request in flight, see `LocalizerWorker`, so
  Triton's FIFO queue is already fair across streams). A request whose deadline has passed
  when its turn comes is answered "stale" without running.
- Every outcome is a JSON payload: errors are answered per request (`{"error": {"type",
  "message"}}`) and never raised, so one bad request cannot fail the others in its batch and
  the server stays up.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rau_rt.errors import InputError, RauRtError
from rau_rt.localization import wire
from rau_rt.localization.localizer import Localizer, LocalizerConfig
from rau_rt.vlm_decoding import GraphRunner

# error types the client maps to its own (rau_rt.localization.remote)
UNKNOWN_REFERENCE = "UnknownReference"
STALE = "Stale"


@dataclass(frozen=True)
class ServiceConfig:
    """Server settings.

    Attributes:
        max_references: references kept (least recently used evicted beyond it).
        max_cache_mb: bound on the kept references' prefix KV caches together (MiB).
        localizer: the settings every reference's localizer gets.
    """

    max_references: int = 32
    max_cache_mb: float = 2048.0
    localizer: LocalizerConfig = field(default_factory=LocalizerConfig)

    def __post_init__(self) -> None:
        if self.max_references < 1:
            raise InputError(f"max_references must be >= 1, got {self.max_references}")
        if not self.max_cache_mb > 0:
            raise InputError(f"max_cache_mb must be > 0, got {self.max_cache_mb}")


@dataclass
class _Entry:
    localizer: Localizer
    cache_bytes: int


class LocalizerService:
    """Registered references and the locate queries on them, over one loaded VLM bundle.

    Args:
        bundle: a loaded VLM bundle (the caller closes it).
        config: settings.
        clock: wall clock in Unix seconds (deadlines are Unix times: towers and server keep
            NTP time, as hospital hosts do).
    """

    def __init__(self, bundle: GraphRunner, config: ServiceConfig = ServiceConfig(), *,
                 clock: Callable[[], float] = time.time) -> None:
        self.bundle = bundle
        self.config = config
        self.clock = clock
        self._references: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # one decode at a time; the LRU with it
        self.counts: dict[str, int] = defaultdict(int)  # answered, errors by type, evictions

    @property
    def reference_ids(self) -> tuple[str, ...]:
        """Registered ids, least recently used first."""
        with self._lock:
            return tuple(self._references)

    def answer(self, requests: Sequence[tuple[np.ndarray, np.ndarray]],
               ) -> list[dict[str, object]]:
        """Answer `(request, data)` pairs that arrived together (the wire format's tensors):
        registrations first, then the locate queries in round-robin order of their streams;
        the answers come back in the requests' order."""
        received = self.clock()
        headers: list[dict[str, object] | Exception] = []
        for request, _ in requests:
            try:
                headers.append(wire.read_header(request))
            except Exception as exc:
                headers.append(exc)
        answers: list[dict[str, object] | None] = [None] * len(requests)
        queries = []
        for n, header in enumerate(headers):
            if isinstance(header, Exception):
                answers[n] = self._error(header)
            elif header["op"] == "register":
                answers[n] = self.register(*requests[n])
            else:
                queries.append(n)
        for n in _round_robin([str(headers[n].get("stream", "")) for n in queries]):
            n = queries[n]
            answers[n] = self._locate(headers[n], requests[n][1], received)
        return answers

    def register(self, request: np.ndarray, data: np.ndarray) -> dict[str, object]:
        """Answer a register request: `{"reference_id", "regions", "prefix_tokens", "known",
        "build_ms"}` or an error payload."""
        try:
            ref_id = wire.reference_id(request, data)
            with self._lock:
                entry = self._references.get(ref_id)
                if entry is not None:
                    self._references.move_to_end(ref_id)
                    return self._registered(ref_id, entry, True, 0.0)
                reference, annotated = wire.decode_reference(request, data)
                started = time.perf_counter()
                localizer = Localizer(self.bundle, reference, self.config.localizer,
                                      annotated=annotated)
                entry = _Entry(localizer, localizer.prefix_cache_bytes)
                self._references[ref_id] = entry
                self._evict()
                self.counts["registered"] += 1
                return self._registered(ref_id, entry, False,
                                        (time.perf_counter() - started) * 1e3)
        except Exception as exc:  # answered, never raised: the server stays up
            return self._error(exc)

    def _locate(self, header: dict[str, object], data: np.ndarray,
                received: float) -> dict[str, object]:
        try:
            deadline = header.get("deadline_unix_s")
            now = self.clock()
            if deadline is not None and now > float(deadline):
                self.counts[STALE] += 1
                return {"error": {"type": STALE, "message": (
                    f"deadline passed {(now - float(deadline)) * 1e3:.0f} ms before the "
                    "request's turn; not run")}}
            regions = header.get("regions")
            if regions is not None and not (isinstance(regions, list) and all(
                    isinstance(r, str) for r in regions)):
                raise InputError(f"regions: expected a list of names or null, got {regions!r}")
            frame = wire.decode_frame(header, data)
            ref_id = str(header.get("reference_id"))
            with self._lock:
                entry = self._references.get(ref_id)
                if entry is None:
                    self.counts[UNKNOWN_REFERENCE] += 1
                    return {"error": {"type": UNKNOWN_REFERENCE, "message": (
                        f"reference {ref_id[:12]} is not registered here (a restarted or "
                        "another server, or evicted): register it again")}}
                self._references.move_to_end(ref_id)
                unknown = [r for r in regions or () if r not in entry.localizer.reference
                           .region_names]
                if unknown:
                    raise InputError(f"regions {unknown} are not on the reference; marked: "
                                     f"{list(entry.localizer.reference.region_names)}")
                started = self.clock()
                result = entry.localizer.locate_result(frame, regions)
            self.counts["answered"] += 1
            payload = wire.result_payload(result)
            payload["server_ms"] = {"waited": (started - received) * 1e3,
                                    "compute": (self.clock() - started) * 1e3}
            return payload
        except Exception as exc:
            return self._error(exc)

    def _registered(self, ref_id: str, entry: _Entry, known: bool,
                    build_ms: float) -> dict[str, object]:
        return {"reference_id": ref_id, "regions": list(entry.localizer.reference.region_names),
                "prefix_tokens": entry.localizer.prefix_tokens, "known": known,
                "build_ms": build_ms}

    def _evict(self) -> None:
        # caller holds the lock; the newest entry stays even if it alone is over the bound
        limit = self.config.max_cache_mb * 2**20
        while len(self._references) > 1 and (
                len(self._references) > self.config.max_references
                or sum(e.cache_bytes for e in self._references.values()) > limit):
            self._references.popitem(last=False)
            self.counts["evicted"] += 1

    def _error(self, exc: BaseException) -> dict[str, object]:
        kind = type(exc).__name__
        self.counts[kind] += 1
        message = str(exc)[:2000]
        if not isinstance(exc, RauRtError):  # a bug or a library error: say where it came from
            message = f"{type(exc).__module__}.{kind}: {message}"
        return {"error": {"type": kind, "message": message}}


def _round_robin(streams: Sequence[str]) -> list[int]:
    """Indices ordered one per stream per round, streams in order of first appearance."""
    queues: dict[str, list[int]] = {}
    for n, stream in enumerate(streams):
        queues.setdefault(stream, []).append(n)
    order = []
    while queues:
        for stream in list(queues):
            order.append(queues[stream].pop(0))
            if not queues[stream]:
                del queues[stream]
    return order
