"""Localizer keyframe queries on CPU: reference prefix cache, constrained decoding, int4, generate.

    python -m benchmarks.bench_localizer [--quick] [--json PATH]

Each model size is built once as a random-init folder and exported with `rau-rt export vlm
--model DIR --input-size 224 --precision int4 --keep-reference` (the bundle keeps the verified
fp32 graphs next to the int4 decoder and int8 vision tower). The reference is a synthetic
angiogram with three annotated segments; every query asks for all three in one synthetic frame.
Cases (`<config>/<precision>/<variant>`; entries of a case take interleaved turns,
benchmarks.harness):
- `cached` vs `uncached`: `Localizer.locate_result` with the reference prefix cache (target
  image + prompt tail only) vs without (both reference images and the whole prompt per query);
  identical answers, so the ratio is the cache's.
- `constrained` vs `free`: the same cached query under the llguidance answer grammar vs free
  greedy decoding with the same token bound (random weights ramble until the bound; the
  fidelity records tokens generated and whether the answer parsed).
- `loop` vs `transformers-generate`: our numpy loop over the fp32 graphs vs `generate` on the
  same weights, the same three-image prompt (images at the model input size, so both
  preprocessings agree) and 24 forced tokens, no cache on either side.
int4 rows use the int4 decoder with the int8 vision tower; their fidelity compares the answer
with the fp32 one. Sizes: tiny (the unit tests' model) and, in full mode, small: a 0.5B-class
Qwen2.5 text model (hidden 896, 24 layers, vocab 151936) with a 1280-wide 8-block vision tower.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from benchmarks.harness import case_record, run_suite, time_interleaved
from rau_rt.bundle import load_bundle
from rau_rt.config import EngineConfig
from rau_rt.export import vlm
from rau_rt.export.vlm import model as vlm_model
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.localization import Decoder, Localizer, LocalizerConfig, prompts
from rau_rt.reference import Reference
from rau_rt.synthetic import generate_sequence, make_reference
from rau_rt.types import Frame
from rau_rt.vlm_layout import family, read_layout

SUITE = "localizer"
INPUT = 224  # 64 tokens per image; three images and ~250 text tokens per prompt
SEGMENTS = ("6", "7", "11")  # proximal LAD, mid LAD, proximal circumflex
NEW_TOKENS = 24
# (size, warmup, timed repetitions per entry)
RUNS = {"quick": [("tiny", 2, 10)], "full": [("tiny", 3, 30), ("small", 1, 4)]}


def _scenario(size: int = 256):
    """(reference, frame): a synthetic reference with three segments (windowed to 8 bits) and
    the last frame of another patient's run (12-bit, as a DICOM source delivers it)."""
    ref = make_reference(seed=1, size=size, segments=SEGMENTS)
    run = generate_sequence(seed=2, frames=24, size=size, segments=SEGMENTS)
    frame = Frame(23, 23 / 15, run.frames[-1], "gray", 12)
    return Reference(ref.image_8bit(), ref.regions, name=ref.view.name), frame


def _agreement(a, b) -> float:
    return float(np.mean([x == y for x, y in zip(a, b, strict=False)])) if a and b else 0.0


def _bench_size(size: str, warmup: int, repeat: int, root: Path) -> list[dict[str, object]]:
    model_dir = vlm_model.build_random(root / f"{size}-model", size)
    summary = vlm.export_vlm(vlm.VlmExportConfig(out=root / size, model=model_dir,
                                                 input_size=INPUT, precision="int4",
                                                 keep_reference=True))
    out = Path(summary["bundle"])
    layout = read_layout(out)
    reference, frame = _scenario()
    names = reference.region_names
    cases = []
    bundles = {"fp32": load_bundle(out, config=EngineConfig(precision="fp32")),
               "int4": load_bundle(out)}
    try:
        answers = {}
        for precision, bundle in bundles.items():
            cached = Localizer(bundle, reference)
            uncached = Localizer(bundle, reference, LocalizerConfig(prefix_cache=False))
            first = cached.locate_result(frame, names)
            free = Localizer(bundle, reference, LocalizerConfig(
                constrained=False, max_new_tokens=max(first.generated_tokens, 1)))
            answer = {"cached": first, "uncached": uncached.locate_result(frame, names),
                      "free": free.locate_result(frame, names)}
            answers[precision] = answer
            samples = time_interleaved(
                {"cached": lambda c=cached: c.locate_result(frame, names),
                 "uncached": lambda u=uncached: u.locate_result(frame, names),
                 "free": lambda f=free: f.locate_result(frame, names)},
                warmup=warmup, repeat=repeat, turn=1)
            base = {"answer_tokens": first.generated_tokens,
                    "prefix_tokens": cached.prefix_tokens,
                    "tail_prompt_tokens": first.prompt_tokens,
                    "cached_prefill_ms": first.timings_ms["prefill"],
                    "uncached_prefill_ms": answer["uncached"].timings_ms["prefill"]}
            if precision != "fp32":
                base["answer_equal_to_fp32"] = first.text == answers["fp32"]["cached"].text
            cases.append(case_record(
                f"{size}/{precision}/cached", "onnxruntime", precision, samples["cached"],
                "uncached", samples["uncached"],
                {**base, "tokens_equal": first.text == answer["uncached"].text}))
            cases.append(case_record(
                f"{size}/{precision}/constrained", "onnxruntime", precision, samples["cached"],
                "free", samples["free"],
                {**base, "free_tokens": answer["free"].generated_tokens,
                 "constrained_parsed": _parsed(first), "free_parsed": _parsed(answer["free"])}))
        cases.append(_versus_generate(size, model_dir, bundles["fp32"], layout, reference,
                                      warmup, max(2, repeat // 3)))
    finally:
        for bundle in bundles.values():
            bundle.close()
    for case in cases:
        print(f"{case['case']}: {case['median_ms']:.1f} ms vs {case['baseline']} "
              f"{case['baseline_median_ms']:.1f} ms ({case['speedup']:.2f}x)", file=sys.stderr)
    return cases


def _parsed(result) -> bool:
    """Whether an answer held a JSON list (regions may still be absent or null)."""
    return not any(r.startswith("no JSON list") for r in result.reasons.values())


def _versus_generate(size, model_dir, bundle, layout, reference, warmup, repeat):
    model, _, _ = vlm_model.load(model_dir)
    rng = np.random.default_rng(0)
    square = Reference(np.ascontiguousarray(
        rng.integers(0, 256, (INPUT, INPUT, 3), dtype=np.uint8)), reference.regions[:1])
    target = rng.integers(0, 256, (INPUT, INPUT, 3), dtype=np.uint8)
    parts = prompts.locate_parts(square, layout, square.region_names)
    images = [square.image, prompts.annotated_image(square), target]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    hf = vlm_verify.hf_inputs(images, tokenizer, family("qwen2_5_vl"), parts.parts)
    ours = Localizer(bundle, square, LocalizerConfig(prefix_cache=False, constrained=False))
    ids = ours.prompt_ids(parts)
    decoder = Decoder(bundle, layout)

    def loop():
        patches = [ours.patches(image, "rgb") for image in images]
        return decoder.generate(ids, decoder.image_features(patches),
                                max_new_tokens=NEW_TOKENS, stop_ids=()).tokens

    def generate():
        with torch.inference_mode():
            return model.generate(**hf, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False)[0, hf["input_ids"].shape[1]:].tolist()

    ids_equal = bool(np.array_equal(ids, hf["input_ids"].numpy()))
    agreement = _agreement(list(loop()), generate())
    # settle: one untimed call per turn, as in bench_vlm: ONNX Runtime's pool threads spin
    # after a call and slowed the next transformers call 7x (1503 vs 210 ms) in a first run
    samples = time_interleaved({"loop": loop, "generate": generate}, warmup=warmup,
                               repeat=repeat, turn=1, settle=1)
    return case_record(f"{size}/fp32/loop", "onnxruntime", "fp32", samples["loop"],
                       "transformers-generate", samples["generate"],
                       {"prompt_ids_equal": ids_equal, "token_agreement": agreement,
                        "prompt_tokens": int(ids.shape[1]), "new_tokens": NEW_TOKENS})


def main(argv: list[str] | None = None) -> int:
    def collect(args, workdir: Path) -> list:
        cases = []
        for size, warmup, repeat in RUNS["quick" if args.quick else "full"]:
            cases += _bench_size(size, warmup, args.repeat or repeat, workdir)
        return cases

    return run_suite("bench_localizer", __doc__, "benchmarks/results/localizer_cpu.json",
                     collect, argv=argv, suite=SUITE,
                     device_extra=lambda: {"torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    sys.exit(main())
