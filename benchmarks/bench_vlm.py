"""VLM on CPU: prefill, per-token decode and 24-token generation, our graphs vs transformers.

    python -m benchmarks.bench_vlm [--quick] [--json PATH]

Each model size is built once as a random-init folder and exported with `rau-rt export vlm
--model DIR --precision int4 --keep-reference` (which verifies the fp32 graphs against
`generate` and keeps them in the bundle); the two int8 decoders are quantized from the same
fp32 graph: `int8` weight-only (MatMulNBits at 8 bits, the exporter's default) and
`int8-dynamic` (one activation scale per tensor). Ours: the bundle's ONNX Runtime engines
driven by the numpy loop (rau_rt.export.vlm.verify.greedy), the runtime's path. Baseline: the
same weights in transformers, eager fp32, in the same process; the four decoders and the
baseline take interleaved turns (benchmarks.harness), so ratios hold on the shared machine.
- prefill: both images through the vision tower + the whole two-image prompt, last logits;
- decode token: one new token after the prompt's KV cache (transformers: the forward with its
  DynamicCache that `generate` runs per token; ours: embed + decoder with the past fed back);
- generate (tiny only): greedy 24 tokens from the prompt (transformers: `generate`).
The record's `exports` holds, per size, what the export cost and wrote: wall time, the
process's peak RSS at the end of each stage, the checkpoint's bytes, every decoder graph's bytes
and those of the bundle an int4 export without `--keep-reference` keeps.
Sizes: tiny (the unit tests' model) and, in full mode, small: a 0.5B-class Qwen2.5 text model
(hidden 896, 24 layers, vocab 151936) with a 1280-wide vision tower of 8 blocks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import case_record, run_suite, time_interleaved
from rau_rt.bundle import load_bundle
from rau_rt.config import EngineConfig
from rau_rt.engines import registry
from rau_rt.export import vlm
from rau_rt.export.vlm import model as vlm_model
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.export.vlm.quantize import QuantizeConfig, quantize
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
RUNS = {"quick": [("tiny", 2, 10)], "full": [("tiny", 3, 20), ("small", 1, 10)]}


class Decoders:
    """The bundle's vision/embed graphs with a swappable decoder engine, Bundle-like."""

    def __init__(self, bundle, decoder) -> None:
        self.bundle, self.decoder = bundle, decoder

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decoder.run(feeds) if graph == DECODER else self.bundle.run(graph, feeds)


def _mib(*files: Path) -> float:
    """Bytes on disk of the files (and their external data), MiB."""
    data = [f.with_name(f.name + ".data") for f in files]
    return round(sum(f.stat().st_size for f in (*files, *data) if f.is_file()) / 2**20, 1)


def _bench_size(size: str, warmup: int, repeat: int,
                root: Path) -> tuple[list[dict[str, object]], dict[str, object]]:
    model_dir = vlm_model.build_random(root / f"{size}-model", size)
    config = vlm.VlmExportConfig(out=root / size, model=model_dir, precision="int4",
                                 keep_reference=True)
    started = time.perf_counter()
    summary = vlm.export_vlm(config)
    export_s = time.perf_counter() - started
    out = Path(summary["bundle"])
    layout = read_layout(out)
    int4_bundle = [out / e["file"] for e in summary["graphs"] if e["precision"] != "fp32"]
    for name, method in (("int8", "weight-only"), ("int8-dynamic", "dynamic")):
        quantize(out / "vlm_decoder.fp32.onnx", out / f"vlm_decoder.{name}.onnx",
                 QuantizeConfig("int8", method=method), vocab_size=layout.vocab_size)
    # what the export costs (in this process, which built the random model first) and what it
    # writes: every decoder's graph and the bundle an int4 export without --keep-reference keeps
    export = {"command": config.command, "export_s": round(export_s, 1),
              "stage_s": summary["stage_s"], "stage_peak_rss_mib": summary["stage_peak_rss_mib"],
              "checkpoint_mib": _mib(*model_dir.glob("*.safetensors")),
              "decoder_mib": {p: _mib(out / f"vlm_decoder.{p}.onnx")
                              for p in ("fp32", "int8", "int8-dynamic", "int4")},
              "int4_bundle_mib": round(_mib(*int4_bundle) + _mib(*(
                  out / f for f in summary["tokenizer_files"])), 1)}
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


def main(argv: list[str] | None = None) -> int:
    def collect(args, workdir: Path) -> tuple[list, dict]:
        cases, exports = [], {}
        for size, warmup, repeat in RUNS["quick" if args.quick else "full"]:
            made, exports[size] = _bench_size(size, warmup, args.repeat or repeat, workdir)
            cases += made
        return cases, {"exports": exports}

    return run_suite("bench_vlm", __doc__, "benchmarks/results/vlm_cpu.json", collect,
                     argv=argv, suite=SUITE,
                     device_extra=lambda: {"torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    sys.exit(main())
