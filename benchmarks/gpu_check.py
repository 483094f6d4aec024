"""One GPU check: the tracker on the torch CUDA backend against sam2's predictor on the same
GPU, with Dice on the trained weights, and the VLM decoder's per-token latency; one JSON.

    python -m benchmarks.gpu_check [--json PATH] [--frames N] [--skip-vlm]

Run it whenever a GPU host is at hand (about 5 minutes on an H100; 8 at most) and commit its
JSON (`benchmarks/results/gpu_check_<gpu>.json`, named after the GPU). It needs torch with CUDA
and this package's own Python dependencies (numpy, opencv, pillow, sam2 1.1.0 for the predictor
baseline and the eager graphs, transformers for the decoder): no onnxruntime-gpu, no TensorRT.
Without a CUDA device, or without sam2 or transformers, it stops at once and says what is
missing. `--device cpu` runs the same code on the CPU (its test does, at `--smoke` size); its
numbers say nothing about a GPU.

Parts:
1. tracker (`benchmarks.bench_tracker.latency_cases`, torch backend): SAM2.1-tiny at 1024 and
   512 (random init with the presence bias: speed and IoU against the predictor), 1, 3 and 8
   regions, fp32 and fp16, profiles `exact` and `fast`, every graph through CUDA graphs where
   a shape repeats (`EngineConfig.cuda_graph`), frame by frame in turn with sam2's
   SAM2VideoPredictor (fp32, as it runs without autocast) on the same frames;
2. trained: the demo SAM2 (micro@256) the same way on held-out cine 101, with Dice against
   the generator's exact truth per case (`task`);
3. vlm: the decoder's per-token latency (bf16, transformers' forward with its KV cache after a
   640-token prompt, the step `generate` runs) for Qwen2.5-VL text configs of the 0.5B, 3B and
   7B class, random weights made on the GPU (no download).
Timings are medians after warm-up with `torch.cuda.synchronize` around each frame or token.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SUITE = "gpu_check"
# (name, hidden, layers, heads, kv heads, intermediate): Qwen2.5's 0.5B, 3B and 7B text models
DECODERS = (("0.5b", 896, 24, 14, 2, 4864), ("3b", 2048, 36, 16, 2, 11008),
            ("7b", 3584, 28, 28, 4, 18944))
SMOKE_DECODER = ("smoke", 64, 2, 4, 2, 128)
VOCAB = 151936
PROMPT_TOKENS = 640
DECODE_WARMUP, DECODE_STEPS = 5, 30


class MissingRequirement(RuntimeError):
    """What this check needs and the host lacks (said before any work starts)."""


def preflight(device: str) -> dict[str, str]:
    """Versions of what the check runs on; raises MissingRequirement naming what is missing."""
    try:
        import torch
    except ImportError as exc:
        raise MissingRequirement(f"torch does not import ({exc}): the GPU check runs on the "
                                 "torch CUDA backend; install torch with CUDA") from exc
    found = {"torch": torch.__version__}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MissingRequirement(
                f"torch {torch.__version__} sees no CUDA device (CUDA build: "
                f"{torch.version.cuda}): this check measures a GPU; run it on a GPU host "
                "(`--device cpu` only exercises the code)")
        found["gpu"] = torch.cuda.get_device_name(device)
        found["cuda"] = str(torch.version.cuda)
    for module, why, install in (
            ("sam2", "its predictor is the baseline and its modules the eager graphs",
             "pip install sam2==1.1.0 (or carry its wheel with hydra-core, iopath, omegaconf)"),
            ("transformers", "the VLM decoder runs through it", "pip install transformers")):
        try:
            imported = __import__(module)
        except ImportError as exc:
            raise MissingRequirement(f"{module} does not import ({exc}): {why}; "
                                     f"{install}") from exc
        found[module] = getattr(imported, "__version__", "unknown")
    return found


def tracker_part(runs, workdir: Path, device: str, log) -> tuple[list[dict], list[dict]]:
    from benchmarks.bench_tracker import latency_cases

    cases, facts = [], []
    for run in runs:
        started = time.perf_counter()
        run_cases, run_facts = latency_cases(run, workdir, device, "torch", ("fp32", "fp16"),
                                             cuda_graph=device.startswith("cuda"))
        run_facts["wall_s"] = round(time.perf_counter() - started, 1)
        cases += run_cases
        facts.append(run_facts)
        log(f"tracker {run.model}@{run.image_size}: {run_facts['wall_s']} s")
    return cases, facts


def _decoder_model(spec: tuple, device: str):
    """A Qwen2.5-VL of the text size `spec`, random weights made on `device` in bf16 (fp32 on
    the CPU), with a one-block vision tower (the decoder alone is timed)."""
    import torch
    import transformers

    from rau_rt.export.vlm.model import mrope_section

    _, hidden, layers, heads, kv_heads, intermediate = spec
    text = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate,
                vocab_size=VOCAB if spec[0] != "smoke" else 512,
                max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                pad_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": mrope_section(hidden // heads)})
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                  out_hidden_size=hidden, fullatt_block_indexes=[0])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, dtype


def _cache_argument(model) -> str:
    """The forward's KV-cache keyword: `cache` in transformers 5.24, `past_key_values` before."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def decoder_case(spec: tuple, device: str, prompt: int, steps: int, warmup: int) -> dict:
    import torch

    model, dtype = _decoder_model(spec, device)
    keyword = _cache_argument(model)
    rng = np.random.default_rng(0)
    vocab = model.config.text_config.vocab_size
    ids = torch.from_numpy(rng.integers(0, vocab, (1, prompt))).to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        started = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        sync()
        prefill_ms = (time.perf_counter() - started) * 1e3
        cache = getattr(out, "cache", None) or out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(warmup + steps):
            started = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{keyword: cache})
            token = out.logits[:, -1:].argmax(-1)
            sync()
            times.append((time.perf_counter() - started) * 1e3)
            cache = getattr(out, "cache", None) or out.past_key_values
    parameters = sum(p.numel() for p in model.model.language_model.parameters()) + \
        model.lm_head.weight.numel() * (not model.config.tie_word_embeddings)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") \
        else None
    del model, out, cache
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    kept = np.asarray(times[warmup:])
    return {"case": f"vlm-decoder/{spec[0]}/{str(dtype).removeprefix('torch.')}",
            "backend": f"transformers-{device.split(':')[0]}",
            "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
            "text_parameters_m": round(parameters / 1e6, 1), "prompt_tokens": prompt,
            "prefill_ms": round(prefill_ms, 2),
            "per_token_median_ms": float(np.median(kept)),
            "per_token_p90_ms": float(np.percentile(kept, 90)), "tokens": len(kept),
            "peak_gpu_gib": None if memory is None else round(memory, 2)}


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda",
                        help="cuda (default) or cuda:N; cpu only exercises the code")
    parser.add_argument("--json", default=None,
                        help="where to write the record (default benchmarks/results/"
                             "gpu_check_<gpu>.json)")
    parser.add_argument("--frames", type=int, default=60, help="frames per tracker case")
    parser.add_argument("--skip-vlm", action="store_true", help="the tracker parts only")
    parser.add_argument("--smoke", action="store_true",
                        help="the test's size: the trained micro@256 at 1 region, a 2-layer "
                             "decoder")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        versions = preflight(args.device)
    except MissingRequirement as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    import torch

    from benchmarks.bench_tracker import Run
    from benchmarks.harness import environment, reproduce_command
    from rau_rt.commands.demo import SHIPPED_SAM2_CONFIG

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    log(f"on {versions.get('gpu', args.device)}: " + ", ".join(
        f"{k} {v}" for k, v in versions.items() if k != "gpu"))
    if args.smoke:
        runs = (Run(SHIPPED_SAM2_CONFIG, 256, min(args.frames, 8), (1,), trained=True),)
        decoders = (SMOKE_DECODER,)
        prompt, steps, warmup = 32, 3, 1
    else:
        runs = (Run("tiny", 1024, args.frames, (1, 3, 8)),
                Run("tiny", 512, args.frames, (1, 3, 8)),
                Run(SHIPPED_SAM2_CONFIG, 256, args.frames, (1, 3, 8), trained=True))
        decoders = DECODERS
        prompt, steps, warmup = PROMPT_TOKENS, DECODE_STEPS, DECODE_WARMUP
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        cases, facts = tracker_part(runs, Path(tmp), args.device, log)
    if not args.skip_vlm:
        for spec in decoders:
            cases.append(decoder_case(spec, args.device, prompt, steps, warmup))
            log(f"decoder {spec[0]}: {cases[-1]['per_token_median_ms']:.2f} ms/token")
    gpu = versions.get("gpu")
    record = {"suite": SUITE, **environment(gpu=gpu), "check_versions": versions,
              "cases": cases, "tracker_runs": facts,
              "command": reproduce_command("gpu_check", args, parser.parse_args([])),
              "wall_s": round(time.perf_counter() - started, 1),
              "torch_threads": torch.get_num_threads()}
    path = Path(args.json or f"benchmarks/results/gpu_check_{gpu_slug(gpu or args.device)}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {path}")
    for case in cases:
        if "median_ms" in case:
            task = case.get("task", {})
            dice = f", Dice {task['dice_ge2mm']:.3f}" if task.get("dice_ge2mm") is not None \
                else ""
            print(f"{case['case']}: {case['median_ms']:.2f} ms/frame, "
                  f"{case['speedup']:.2f}x the predictor{dice}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
