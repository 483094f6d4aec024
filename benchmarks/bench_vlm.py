"""VLM on CPU: prefill, per-token decode and 24-token generation, our graphs vs transformers.

    python -m benchmarks.bench_vlm [--quick | --scale | --exports] [--json PATH]

Each model size is built once as a random-init folder (in its own process) and exported with
`rau-rt export vlm --model DIR --precision int4 --keep-reference` in its own process too, so
that the peak RSS recorded is the export's alone (the export verifies the fp32 graphs against
`generate` where they fit its memory bound, and keeps them); the two int8 decoders are
quantized from the same fp32 graph: `int8` weight-only (MatMulNBits at 8 bits, the
exporter's default) and `int8-dynamic` (one activation scale per tensor). Ours: the bundle's
ONNX Runtime engines driven by the numpy loop (rau_rt.export.vlm.verify.greedy), the runtime's
path. Baseline: the same weights in transformers, eager fp32, in the same process; the four
decoders and the baseline take interleaved turns (benchmarks.harness), so ratios hold on the
shared machine.
- prefill: both images through the vision tower + the whole two-image prompt, last logits;
- decode token: one new token after the prompt's KV cache (transformers: the forward with its
  DynamicCache that `generate` runs per token; ours: embed + decoder with the past fed back);
- generate (tiny only): greedy 24 tokens from the prompt (transformers: `generate`).
The record's `exports` holds, per size, what the export cost and wrote: wall time, the
export's peak RSS at the end of each stage against its memory bound (1.5 x the checkpoint's
bf16 bytes + 2 GiB), the checkpoint's bytes, every decoder graph's bytes and those of the
bundle an int4 export without `--keep-reference` keeps.
Sizes: tiny (the unit tests' model) and, in full mode, small: a 0.5B-class Qwen2.5 text model
(hidden 896, 24 layers, vocab 151936) with a 1280-wide vision tower of 8 blocks. `--scale`:
3b, Qwen2.5-VL 3B's shapes (text 2048 x 36 layers, the 32-block vision tower), for which only
the export and each decoder's per-token latency are measured (`EXPORT_ONLY`). `--exports`:
what the small size's export costs at each precision, each alone as a user runs it (no
`--keep-reference`): wall time, peak RSS per stage against the bound, the bundle's bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import case_record, run_suite, time_interleaved
from rau_rt.bundle import load_bundle
from rau_rt.config import EngineConfig
from rau_rt.engines import registry
from rau_rt.export.vlm import model as vlm_model
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.export.vlm.quantize import QuantizeConfig, quantize
from rau_rt.export.vlm.stages import graph_mib
from rau_rt.vlm_decoding import Decoder
from rau_rt.vlm_layout import DECODER, EMBED, decode_positions, read_layout, rope_positions

SUITE = "vlm"
BASELINE = "transformers-eager"
NEW_TOKENS = 24
# timed calls per turn, after one untimed call: ONNX Runtime's pool threads spin for a while
# after a call and slowed the next transformers call 40x in a first run without it (61 vs 1.5 ms)
TURN = 5
# (size, warmup, timed repetitions); small's prefill (15-25 s a call on 2 shared cores) is
# timed twice per entry.
RUNS = {"quick": [("tiny", 2, 10)], "full": [("tiny", 3, 20), ("small", 1, 10)],
        "scale": [("3b", 0, 5)]}
# `--exports`: the size and precisions whose export cost is measured alone
EXPORT_COSTS = ("small", ("fp32", "fp16", "int8", "int4"))
# Sizes measured without transformers: the export and the decoders' per-token latency only
# (the fp32 model in transformers would hold 15 GB at 3b; the export holds it in bf16).
EXPORT_ONLY = ("3b",)


class Decoders:
    """The bundle's vision/embed graphs with a swappable decoder engine, Bundle-like."""

    def __init__(self, bundle, decoder) -> None:
        self.bundle, self.decoder = bundle, decoder

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decoder.run(feeds) if graph == DECODER else self.bundle.run(graph, feeds)


def _mib(*files: Path) -> float:
    """Bytes on disk of the files (and their external data), MiB."""
    return round(sum(graph_mib(f) for f in files if f.is_file()), 1)


def _export(model_dir: Path, out: Path, precision: str, keep_reference: bool) -> dict:
    """`rau-rt export vlm` in its own process (so that its peak RSS is the export's own);
    its summary, with the wall time the parent saw."""
    command = [sys.executable, "-m", "rau_rt", "export", "vlm", "--model", str(model_dir),
               "--precision", precision, "--out", str(out), "--json",
               *(["--keep-reference"] if keep_reference else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout), "wall_s": round(time.perf_counter() - started, 1)}


def _export_record(summary: dict, model_dir: Path, out: Path) -> dict[str, object]:
    """What an export cost and wrote: wall time, peak RSS per stage against the memory bound,
    the checkpoint's bytes, every decoder's bytes, the bundle an int4 export keeps."""
    int4_bundle = [out / e["file"] for e in summary["graphs"] if e["precision"] != "fp32"]
    peak = max(summary["stage_peak_rss_mib"].values())
    return {"command": f"rau-rt export vlm --model {model_dir.name} --precision int4 "
                       "--keep-reference", "export_s": summary["wall_s"],
            "stage_s": summary["stage_s"], "stage_peak_rss_mib": summary["stage_peak_rss_mib"],
            "peak_rss_mib": peak, "memory": summary["memory"],
            "within_bound": peak <= summary["memory"]["bound_mib"],
            "end_to_end": {k: v for k, v in summary["end_to_end"].items()
                           if k in ("skipped", "passed", "prefill_logits_max_abs")},
            "checkpoint_mib": _mib(*model_dir.glob("*.safetensors")),
            "decoder_mib": {p: _mib(out / f"vlm_decoder.{p}.onnx")
                            for p in ("fp32", "int8", "int8-dynamic", "int4")
                            if (out / f"vlm_decoder.{p}.onnx").is_file()},
            "int4_bundle_mib": round(_mib(*int4_bundle) + _mib(*(
                out / f for f in summary["tokenizer_files"])), 1)}


def _build(size: str, root: Path) -> Path:
    """A random-init model folder of `size`, built in its own process."""
    model_dir = root / f"{size}-model"
    subprocess.run([sys.executable, "-c", "import sys; from rau_rt.export.vlm.model import "
                    "build_random; build_random(sys.argv[1], sys.argv[2])", str(model_dir), size],
                   check=True, capture_output=True)
    return model_dir


def _export_costs(size: str, root: Path) -> dict[str, object]:
    """What `rau-rt export vlm` costs at each precision (`--exports`): every export in its own
    process, without `--keep-reference`, its bundle deleted after it is measured."""
    import shutil

    model_dir = _build(size, root)
    costs: dict[str, object] = {"checkpoint_mib": _mib(*model_dir.glob("*.safetensors"))}
    for precision in EXPORT_COSTS[1]:
        out = root / f"{size}-{precision}"
        summary = _export(model_dir, out, precision, keep_reference=False)
        peak = max(summary["stage_peak_rss_mib"].values())
        costs["memory"] = summary["memory"]
        costs[precision] = {
            "command": f"rau-rt export vlm --model {model_dir.name} --precision {precision}",
            "export_s": summary["wall_s"], "stage_s": summary["stage_s"],
            "stage_peak_rss_mib": summary["stage_peak_rss_mib"], "peak_rss_mib": peak,
            "within_bound": peak <= summary["memory"]["bound_mib"],
            "bundle_mib": summary["bundle_mb"],
            "graph_mib": {g["file"]: _mib(out / g["file"]) for g in summary["graphs"]}}
        print(f"{size} {precision}: {summary['wall_s']} s, peak {peak:.0f} MiB, bundle "
              f"{summary['bundle_mb']:.0f} MiB", flush=True)
        shutil.rmtree(out)
    return costs


def _bench_size(size: str, warmup: int, repeat: int,
                root: Path) -> tuple[list[dict[str, object]], dict[str, object]]:
    model_dir = _build(size, root)
    out = root / size
    summary = _export(model_dir, out, "int4", keep_reference=True)
    export_s = summary["wall_s"]
    layout = read_layout(out)
    for name, method in (("int8", "weight-only"), ("int8-dynamic", "dynamic")):
        quantize(out / "vlm_decoder.fp32.onnx", out / f"vlm_decoder.{name}.onnx",
                 QuantizeConfig("int8", method=method), vocab_size=layout.vocab_size)
    export = _export_record(summary, model_dir, out)
    if size in EXPORT_ONLY:
        return _decode_only(size, out, layout, repeat), export
    model, tokenizer, fam = vlm_model.load(model_dir)
    images = vlm_verify.sample_images(layout.input_size)
    ids, patches = vlm_verify.runtime_inputs(images, layout, out / "tokenizer.json")
    hf = vlm_verify.hf_inputs(images, tokenizer, fam)
    prompt = ids.shape[1]
    with torch.inference_mode():
        reference_logits = model(**hf).logits[0, -1].numpy()
        reference_tokens = model.generate(**hf, max_new_tokens=NEW_TOKENS,
                                          min_new_tokens=NEW_TOKENS,
                                          do_sample=False)[0, prompt:].tolist()
        prefix = model(**hf, use_cache=True)
    step_ids = torch.tensor([[reference_tokens[0]]])

    def hf_prefill():
        with torch.inference_mode():
            model(**hf)

    def hf_step():
        # the step generate runs per token; the cache grows by one token per call (negligible
        # against the ~530-token prompt), positions follow from the stored rope deltas
        with torch.inference_mode():
            model(input_ids=step_ids, cache=prefix.cache, use_cache=True)

    def hf_generate():
        with torch.inference_mode():
            model.generate(**hf, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False)

    bundle = load_bundle(out, config=EngineConfig(precision="fp32"))
    engines = {p: registry.open_engine(out / f"vlm_decoder.{p}.onnx", "onnxruntime",
                                       precision=p.split("-")[0])
               for p in ("fp32", "int8", "int8-dynamic", "int4")}
    calls: dict[str, dict[str, object]] = {"prefill": {BASELINE: hf_prefill},
                                           "decode_token": {BASELINE: hf_step}}
    if size == "tiny":  # small's 24-token generation costs ~40 s a call on 2 cores
        calls[f"generate_{NEW_TOKENS}"] = {BASELINE: hf_generate}
    fidelity = {}
    empty = np.zeros((0, layout.hidden_size), np.float32)
    try:
        for precision, engine in engines.items():
            graphs = Decoders(bundle, engine)
            tokens, logits = vlm_verify.greedy(graphs, layout, ids, patches, NEW_TOKENS,
                                               min_new_tokens=NEW_TOKENS)
            fidelity[precision] = {
                "prefill_logits_cosine": vlm_verify.cosine(logits[0], reference_logits),
                "prefill_logits_max_abs": float(np.max(np.abs(logits[0] - reference_logits))),
                "token_agreement_vs_generate": float(np.mean(
                    [a == b for a, b in zip(tokens, reference_tokens, strict=True)])),
                "prompt_tokens": int(prompt), "export_s": round(export_s, 1)}
            embeds = bundle.run(EMBED, {"input_ids": ids, **Decoder(bundle, layout)
                                        .image_features(patches).feeds()})
            positions, delta = rope_positions(ids, layout)
            past = engine.run({"inputs_embeds": embeds["inputs_embeds"],
                               "attention_mask": np.ones((1, prompt), np.int64),
                               "position_ids": positions, **layout.empty_past(1)})
            step_feeds = {"attention_mask": np.ones((1, prompt + 1), np.int64),
                          "position_ids": decode_positions(prompt, delta),
                          **{p: past[q] for p, q in zip(layout.past_names,
                                                        layout.present_names, strict=True)}}

            def step(graphs=graphs, engine=engine, feeds=step_feeds, token=tokens[0]):
                new = graphs.run(EMBED, {"input_ids": np.array([[token]], np.int64),
                                         "image_features": empty})
                engine.run({"inputs_embeds": new["inputs_embeds"], **feeds})

            calls["prefill"][precision] = (
                lambda g=graphs: vlm_verify.greedy(g, layout, ids, patches, 1))
            calls["decode_token"][precision] = step
            if f"generate_{NEW_TOKENS}" in calls:
                calls[f"generate_{NEW_TOKENS}"][precision] = (
                    lambda g=graphs: vlm_verify.greedy(g, layout, ids, patches, NEW_TOKENS,
                                                       min_new_tokens=NEW_TOKENS))
        cases = []
        for name, entries in calls.items():
            # all five in one interleaved loop, so that every ratio is from the same turns;
            # calls of seconds (small's prefill) need no settling call after ONNX Runtime
            slow = size != "tiny" and name != "decode_token"
            reps = max(2, repeat // 4) if name.startswith("generate") else repeat
            samples = time_interleaved(entries, warmup=warmup, repeat=2 if slow else reps,
                                       turn=1 if slow else min(TURN, reps),
                                       settle=0 if slow else 1)
            for precision in engines:
                record = case_record(f"{size}_{name}", "onnxruntime", f"decoder {precision}",
                                     samples[precision], BASELINE, samples[BASELINE],
                                     dict(fidelity[precision]))
                if name == "decode_token":
                    record["fidelity"]["decode_speedup_vs_fp32_graph"] = (
                        float(np.median(samples["fp32"])) / record["median_ms"])
                cases.append(record)
                print(f"{size} {name} {precision}: {record['median_ms']:.2f} ms vs "
                      f"{record['baseline_median_ms']:.2f} ms", file=sys.stderr)
    finally:
        bundle.close()
        for engine in engines.values():
            engine.close()
    return cases, export


def _decode_only(size: str, out: Path, layout, repeat: int) -> list[dict[str, object]]:
    """Per-token decode latency of each decoder, one open at a time beside the bundle's lowered
    vision and embed graphs, against the fp32 graph measured before them in the same run (not
    interleaved: two 3b decoders do not fit beside each other with room to spare)."""
    ids, patches = vlm_verify.runtime_inputs(vlm_verify.sample_images(layout.input_size),
                                             layout, out / "tokenizer.json")
    prompt = ids.shape[1]
    positions, delta = rope_positions(ids, layout)
    empty = np.zeros((0, layout.hidden_size), np.float32)
    samples: dict[str, np.ndarray] = {}
    prefill_ms: dict[str, float] = {}
    with load_bundle(out) as bundle:  # int8 vision, fp16 embed (and the int4 decoder)
        features = Decoder(bundle, layout).image_features(patches)
        embeds = bundle.run(EMBED, {"input_ids": ids, **features.feeds()})["inputs_embeds"]
        for precision in ("fp32", "int8", "int8-dynamic", "int4"):
            with registry.open_engine(out / f"vlm_decoder.{precision}.onnx", "onnxruntime",
                                      precision=precision.split("-")[0]) as engine:
                started = time.perf_counter()
                past = engine.run({"inputs_embeds": embeds,
                                   "attention_mask": np.ones((1, prompt), np.int64),
                                   "position_ids": positions, **layout.empty_past(1)})
                prefill_ms[precision] = (time.perf_counter() - started) * 1e3
                token = int(np.argmax(past["logits"][0]))
                feeds = {"attention_mask": np.ones((1, prompt + 1), np.int64),
                         "position_ids": decode_positions(prompt, delta),
                         **{p: past[q] for p, q in zip(layout.past_names, layout.present_names,
                                                       strict=True)}}

                def step(engine=engine, feeds=feeds, token=token):
                    new = bundle.run(EMBED, {"input_ids": np.array([[token]], np.int64),
                                             "image_features": empty})
                    engine.run({"inputs_embeds": new["inputs_embeds"], **feeds})

                step()  # settles the session's first-call allocations
                samples[precision] = time_interleaved({precision: step}, warmup=0,
                                                      repeat=repeat)[precision]
            print(f"{size} decode_token {precision}: {np.median(samples[precision]):.1f} ms",
                  file=sys.stderr)
    return [case_record(f"{size}_decode_token", "onnxruntime", f"decoder {precision}",
                        samples[precision], "decoder fp32 (same run, before)", samples["fp32"],
                        {"prefill_decoder_ms": round(prefill_ms[precision], 1),
                         "prompt_tokens": int(prompt)})
            for precision in samples]


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    scale, costs = "--scale" in given, "--exports" in given

    def collect(args, workdir: Path) -> tuple[list, dict]:
        cases, exports = [], {}
        if args.exports:
            return [], {"export_costs": {EXPORT_COSTS[0]: _export_costs(EXPORT_COSTS[0],
                                                                        workdir)}}
        mode = "scale" if args.scale else "quick" if args.quick else "full"
        for size, warmup, repeat in RUNS[mode]:
            made, exports[size] = _bench_size(size, warmup, args.repeat or repeat, workdir)
            cases += made
        return cases, {"exports": exports}

    def flags(parser) -> None:
        parser.add_argument("--scale", action="store_true",
                            help="the 3b size only (about 25 minutes, 35 GB of disk): its "
                                 "export and each decoder's per-token latency, to "
                                 "vlm_scale_cpu.json")
        parser.add_argument("--exports", action="store_true",
                            help="what the small size's export costs at each precision (wall, "
                                 "peak RSS, bundle bytes; about 10 minutes), to "
                                 "vlm_exports_cpu.json")

    default = ("vlm_scale_cpu.json" if scale else "vlm_exports_cpu.json" if costs
               else "vlm_cpu.json")
    return run_suite("bench_vlm", __doc__, f"benchmarks/results/{default}", collect, argv=argv,
                     suite=SUITE, extra_args=flags,
                     device_extra=lambda: {"torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    sys.exit(main())
