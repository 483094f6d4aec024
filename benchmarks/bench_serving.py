"""The central localizer on loopback: keyframe round trips, throughput under concurrent streams.

    python -m benchmarks.bench_serving [--quick] [--json PATH] [--env DIR]

The VLM is the demo's (`rau-rt demo`'s cached bundle: the random tiny Qwen2.5-VL at 224 px
while no trained demo VLM ships; its answers ramble to the grammar's bound, so every query
decodes the longest answer and the numbers are an upper bound per query). The server is
`rau-rt serve-localizer` from the server environment (`--env`, default ./.venv-server),
started by the benchmark on loopback; client and server share this machine's cores.
Frames are synthetic angiograms (512 px, 8-bit); each stream has its own reference (another
synthetic patient), registered once.
- `roundtrip/<local|http|grpc>`: one stream, one query at a time; local is the same
  `Localizer` in this process (the baseline), remote the `RemoteLocalizer` (HTTP or gRPC),
  in interleaved turns (benchmarks.harness).
- `load/<n>s/<batching>`: n streams (1, 4, 8), each on its own thread sending its next query
  as soon as the last one is answered (closed loop, saturation), for a fixed time; batching
  "on" (`--max-batch 8`) lets Triton's dynamic batcher hand the service up to 8 queued
  requests at once, "off" (`--max-batch 1`, the server's default) one. Records throughput,
  latency percentiles and the mean per-request split (queue: waiting in the server's batch;
  vision, prefill, decode: the VLM; network: the rest of the round trip, with Triton's own
  queue).
- `towers_at_1hz`: how many streams asking one keyframe a second one server sustains here:
  the saturated throughput with the most streams (8), the better batching setting, floored
  (a stream at 1 Hz needs its answer within the second, so p99 at that load is recorded
  beside).
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import case_record, run_suite, stats, time_interleaved
from rau_rt.bundle import load_bundle
from rau_rt.localization import Localizer
from rau_rt.localization.remote import RemoteConfig, RemoteLocalizer
from rau_rt.reference import Reference
from rau_rt.serving import environment
from rau_rt.serving.process import ServerProcess
from rau_rt.synthetic import generate_sequence
from rau_rt.synthetic import make_reference as synthetic_reference

SUITE = "serving"
FRAME_SIZE = 512
STREAMS = (1, 4, 8)
SPLIT = ("queue", "vision", "prefill", "decode", "network")
# (round-trip warmup, repeat, seconds per load case)
RUNS = {"quick": (1, 6, 8.0), "full": (2, 20, 30.0)}


def demo_bundle() -> Path:
    """The VLM part of `rau-rt demo`'s cached bundle (built when missing)."""
    from rau_rt.commands import demo

    parser = argparse.ArgumentParser()
    demo.configure(parser)
    args = parser.parse_args([])
    bundle, _ = demo.cached_bundle(demo._bundle_spec(args), demo.cache_root(), False,
                                   progress=False)
    return bundle / "vlm"


def scenario(streams: int) -> tuple[list[Reference], list[np.ndarray]]:
    references = []
    for n in range(streams):
        still = synthetic_reference(seed=100 + n, size=FRAME_SIZE)
        references.append(Reference(still.image_8bit(), still.regions, name=f"patient {n}"))
    frames = list(generate_sequence(seed=7, frames=12, size=FRAME_SIZE).frames_8bit()[4:])
    return references, frames


def load_case(url: str, references: list[Reference], frames: list[np.ndarray], streams: int,
              seconds: float) -> dict[str, object]:
    clients = [RemoteLocalizer(url, references[n], RemoteConfig(stream=f"tower{n}",
                                                                timeout_s=60.0))
               for n in range(streams)]
    latencies: list[list[float]] = [[] for _ in clients]
    splits: list[list[dict[str, float]]] = [[] for _ in clients]
    errors = [0] * streams
    stop = time.monotonic() + seconds

    def stream(n: int) -> None:
        k = 0
        while time.monotonic() < stop:
            try:
                result = clients[n].locate_result(frames[(n + k) % len(frames)])
            except Exception:
                errors[n] += 1
                continue
            latencies[n].append(result.timings_ms["total"])
            splits[n].append({s: result.timings_ms.get(s, 0.0) for s in SPLIT})
            k += 1

    started = time.monotonic()
    threads = [threading.Thread(target=stream, args=(n,)) for n in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    for c in clients:
        c.close()
    every = np.array([ms for per in latencies for ms in per])
    answered = len(every)
    split = {s: float(np.mean([p[s] for per in splits for p in per])) if answered else None
             for s in SPLIT}
    per_stream = [len(per) for per in latencies]
    return {"answers": answered, "errors": sum(errors), "wall_s": wall,
            "throughput_per_s": answered / wall, "answers_per_stream": per_stream,
            "fairness_min_over_max": min(per_stream) / max(max(per_stream), 1),
            **stats(every), "split_mean_ms": split}


def collect(args: argparse.Namespace, workdir: Path) -> tuple[list, dict]:
    env = environment.find_env(args.env)
    if env is None:
        sys.exit("no server environment: rau-rt serve-localizer --make-env .venv-server")
    warmup, repeat, seconds = RUNS["quick" if args.quick else "full"]
    if args.repeat:
        repeat = args.repeat
    folder = demo_bundle()
    references, frames = scenario(max(STREAMS))
    cases, loads = [], []
    with load_bundle(folder) as bundle:
        local = Localizer(bundle, references[0])
        with ServerProcess(folder, env, workdir / "triton", ["--max-batch", "8"]) as server:
            http = RemoteLocalizer(server.url, references[0])
            grpc = RemoteLocalizer(server.grpc_url, references[0])
            frame = frames[0]
            expected = local.locate_result(frame).text
            agree = {name: c.locate_result(frame).text == expected
                     for name, c in (("http", http), ("grpc", grpc))}
            samples = time_interleaved(
                {"local": lambda: local.locate_result(frame),
                 "http": lambda: http.locate_result(frame),
                 "grpc": lambda: grpc.locate_result(frame)}, warmup=warmup, repeat=repeat)
            for name in ("http", "grpc"):
                cases.append(case_record(f"roundtrip/{name}", f"triton-{name}", "fp32",
                                         samples[name], "local Localizer", samples["local"],
                                         {"same_answer_as_local": float(agree[name])}))
            http.close()
            grpc.close()
            for n in STREAMS:
                loads.append({"case": f"load/{n}s/batching-on", "streams": n, "max_batch": 8,
                              **load_case(server.url, references, frames, n, seconds)})
        with ServerProcess(folder, env, workdir / "triton1", ["--max-batch", "1"]) as server:
            for n in STREAMS:
                loads.append({"case": f"load/{n}s/batching-off", "streams": n, "max_batch": 1,
                              **load_case(server.url, references, frames, n, seconds)})
    best = max((c for c in loads if c["streams"] == max(STREAMS)),
               key=lambda c: c["throughput_per_s"])
    facts = {"bundle": str(folder), "load": loads,
             "towers_at_1hz": {"streams": math.floor(best["throughput_per_s"]),
                               "from_case": best["case"],
                               "p99_ms_at_that_load": best["p99_ms"]},
             "summary_md": load_table(loads)}
    return cases, facts


def load_table(loads: list[dict[str, object]]) -> str:
    lines = ["| streams | batching | answers/s | p50 ms | p99 ms | min/max answers per stream "
             "| queue / vision / prefill / decode / network ms |", "|---|---|---|---|---|---|---|"]
    for c in loads:
        split = " / ".join(f"{c['split_mean_ms'][s]:.0f}" for s in SPLIT)
        lines.append(f"| {c['streams']} | {'on' if c['max_batch'] > 1 else 'off'} | "
                     f"{c['throughput_per_s']:.2f} | {c['median_ms']:.0f} | {c['p99_ms']:.0f} | "
                     f"{c['fairness_min_over_max']:.2f} | {split} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--env", default=None,
                            help="the server environment (default ./.venv-server)")

    return run_suite("bench_serving", __doc__, "benchmarks/results/serving_cpu.json", collect,
                     argv=argv, suite=SUITE, extra_args=extra)


if __name__ == "__main__":
    sys.exit(main())
