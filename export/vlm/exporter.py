"""`rau-rt export vlm`: a Qwen-VL fine-tune -> verified vision / embed / decoder graphs + tokenizer.

Stages (each a function; `export_vlm` runs them in order with a progress bar, and records
each one's peak RSS against the memory bound, `memory_record`):
1. load the model folder (or build a random-init one) in its stored dtype (bf16 for released
   checkpoints) and check it (rau_rt.export.vlm.model);
2. check the runtime's preprocessing and prompt ids against transformers' processor;
3. export the fp32 graphs (rau_rt.export.vlm.graphs: traced without weights, which are
   written upcast one tensor at a time) and compute each graph's eager outputs in fp32;
4. transformers' greedy answer in fp32; then the model is freed;
5. verify each fp32 graph against its eager outputs, and end to end through the fp32 bundle:
   prefill logits and greedy tokens vs `generate` (skipped, and recorded so, when the fp32
   graphs exceed the memory bound and are not what ships);
6. lower (int8: decoder weight-only MatMulNBits or dynamic, vision dynamic int8; int4:
   decoder MatMulNBits, vision dynamic int8; fp16: all three converted,
   rau_rt.export.vlm.fp16), one weight at a time, and record their drift against the eager
   references, gating int8 and fp16 (rau_rt.export.verify's VLM tolerances);
7. write manifest.json, vlm.json (rau_rt.vlm_layout) and the tokenizer files.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rau_rt._version import __version__
from rau_rt.bundle import (
    GraphEntry,
    Manifest,
    file_sha256,
    side_files,
    tool_versions,
    write_manifest,
)
from rau_rt.errors import InputError
from rau_rt.export.verify import (
    VLM_PATCH_ATOL,
    ParityError,
)
from rau_rt.export.vlm import graphs as vlm_graphs
from rau_rt.export.vlm import model as vlm_model
from rau_rt.export.vlm import stages as vlm_stages
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.export.vlm.quantize import INT8_METHODS
from rau_rt.profiling import peak_rss_mib, release_freed_memory, reset_peak_rss
from rau_rt.vlm_layout import (
    DECODER,
    EMBED,
    VISION,
    VlmLayout,
    aspect_sizes,
    write_layout,
)
from rau_rt.vlm_layout import family as family_of

PRECISIONS = ("fp32", "fp16", "int8", "int4")
# Which precision each graph gets per requested precision. The embedding is a table lookup
# (nothing to quantize; fp16 halves the table); the vision tower takes dynamic int8 in both
# quantized bundles (0.999 cosine on SigLIP; MatMulNBits has no gain on its activation-heavy
# attention); fp16 converts all three (rau_rt.export.vlm.fp16).
GRAPH_PRECISION = {"fp32": {VISION: "fp32", EMBED: "fp32", DECODER: "fp32"},
                   "fp16": {VISION: "fp16", EMBED: "fp16", DECODER: "fp16"},
                   # the embedding table (a vocab x hidden Gather, no MatMul to quantize) in
                   # fp16: half the bytes, gated like the fp16 bundle's graphs
                   "int8": {VISION: "int8", EMBED: "fp16", DECODER: "int8"},
                   "int4": {VISION: "int8", EMBED: "fp16", DECODER: "int4"}}


@dataclass(frozen=True)
class VlmExportConfig:
    """`rau-rt export vlm` options (one field per flag).

    Attributes:
        out: The bundle directory.
        model: A Hugging Face model folder; or None with `random_init`.
        random_init: "tiny", "small" or "3b": build a random-init model and tokenizer instead
            (rau_rt.export.vlm.model.RANDOM_INIT).
        family: model type for `random_init` ("qwen2_5_vl", "qwen2_vl" or "qwen3_vl").
        input_size: square VLM input side in pixels (a multiple of patch x merge: 28;
            Qwen3-VL 32).
        aspect_buckets: also export the vision graph at the other aspects of
            `rau_rt.vlm_layout.ASPECTS` at the same pixel budget (what Qwen's processor makes
            of 4:3 and 16:9 frames and their transposes), so frames keep their aspect.
        precision: "fp32", "fp16", "int8" or "int4" (per graph: see GRAPH_PRECISION).
        int8_method: the int8 decoder's method: "weight-only" (MatMulNBits at 8 bits, robust to
            a trained model's outlier activation channels) or "dynamic" (one activation scale
            per tensor: faster at prefill, refused by the gate where outliers break it); see
            rau_rt.export.vlm.quantize.
        block_size: MatMulNBits (int4, weight-only int8) weights per scale.
        quantize_lm_head: quantize the output projection too.
        hidden_state: give the decoder a last_hidden_state output (for seg-token heads).
        keep_reference: keep the verified fp32 graphs beside the lowered ones (int8, int4,
            fp16 bundles); by default a lowered bundle holds only what runs: the lowered graphs,
            the graphs that stay fp32 (the embedding table) and the tokenizer. The fp32 graphs
            are what other precisions are re-derived from (`rau-rt export trt` builds from fp16
            or fp32 ONNX, int4 is not a TensorRT op).
        new_tokens: greedy tokens compared with `generate` (>= 24 per the acceptance).
        max_context: longest prompt + generation the manifest's ranges allow.
        progress: show a progress bar per stage.
    """

    out: Path
    model: Path | None = None
    random_init: str | None = None
    family: str = "qwen2_5_vl"
    input_size: int = 448
    aspect_buckets: bool = False
    precision: str = "fp32"
    int8_method: str = "weight-only"
    block_size: int = 32
    quantize_lm_head: bool = False
    hidden_state: bool = False
    keep_reference: bool = False
    new_tokens: int = 24
    max_context: int = 4096
    progress: bool = False

    def __post_init__(self) -> None:
        if (self.model is None) == (self.random_init is None):
            raise InputError("give exactly one of --model DIR and --random-init tiny|small|3b")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: choose one of {PRECISIONS}")
        if self.int8_method not in INT8_METHODS:
            raise InputError(f"--int8-method {self.int8_method!r}: choose one of "
                             f"{INT8_METHODS}")
        if self.new_tokens < 1:
            raise InputError("--new-tokens must be >= 1")

    @property
    def command(self) -> str:
        source = f"--model {self.model}" if self.model else f"--random-init {self.random_init}"
        return (f"rau-rt export vlm {source} --input-size {self.input_size} "
                + ("--aspect-buckets " if self.aspect_buckets else "")
                + f"--precision {self.precision} "
                + (f"--int8-method {self.int8_method} " if self.precision == "int8" else "")
                + ("--keep-reference " if self.keep_reference else "") + f"--out {self.out}")


def memory_record(model) -> dict[str, float]:
    """The model's parameter count, its bytes in bf16 and the export's memory bound (issue 19's
    goal: peak RSS <= 1.5 x the bf16 bytes + 2 GiB), in MiB."""
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    bf16_mib = 2 * params / 2**20
    return {"parameters": params, "bf16_mib": round(bf16_mib, 1),
            "bound_mib": round(1.5 * bf16_mib + 2048, 1),
            "bound": "1.5 x the checkpoint's bf16 bytes + 2 GiB"}


def checkpoint_sha256(directory: Path) -> str:
    """sha256 over the weight files' sha256s, in name order."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def make_layout(model, family: str, input_size: int, hidden_state: bool,
                aspect_buckets: bool = False) -> VlmLayout:
    """The bundle's `vlm.json` for `model` at a square `input_size` (and, with
    `aspect_buckets`, the other aspects at its pixel budget)."""
    fam = family_of(family)
    if input_size % fam.factor:
        raise InputError(f"--input-size {input_size}: must be a multiple of {fam.factor} "
                         f"({fam.name}: patch {fam.patch_size} x merge {fam.merge_size})")
    text = model.config.text_config
    grid = input_size // fam.patch_size
    eos = model.generation_config.eos_token_id
    past, present = vlm_graphs.kv_names(text.num_hidden_layers)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return VlmLayout(
        family=family, input_size=(input_size, input_size), grid_thw=(1, grid, grid),
        patch_dim=3 * fam.temporal_patch_size * fam.patch_size ** 2,
        tokens_per_image=(grid // fam.merge_size) ** 2, hidden_size=text.hidden_size,
        vocab_size=text.vocab_size, num_layers=text.num_hidden_layers,
        num_kv_heads=text.num_key_value_heads, head_dim=head_dim,
        mrope_section=tuple(text.rope_parameters["mrope_section"]),
        image_token_id=model.config.image_token_id,
        vision_start_token_id=model.config.vision_start_token_id,
        vision_end_token_id=model.config.vision_end_token_id,
        eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
        pad_token_id=model.generation_config.pad_token_id, has_hidden_state=hidden_state,
        deepstack_layers=(len(model.config.vision_config.deepstack_visual_indexes)
                          if fam.deepstack else 0),
        past_names=past, present_names=present,
        buckets=tuple(size for size in aspect_sizes(input_size ** 2, fam.factor)
                      if size != (input_size, input_size)) if aspect_buckets else ())


def _ranges(layout: VlmLayout, graph: str, prompt: int, max_context: int) -> dict[str, dict]:
    """Dynamic ranges of `graph`'s inputs: the TensorRT optimisation profile, and what
    `Bundle.run` checks feeds against.

    `min` and `opt` are each one call the runtime makes, so their shapes agree with each other
    (a decoder's attention mask is as long as its past plus its new tokens): `min` the first
    token with no past, `opt` a decode step right after a `prompt`-token prefill (the call the
    loop makes most). `max` bounds every dimension on its own (TensorRT's profile semantics):
    a prefill of up to `max_context` tokens, or a decode step at `max_context - 1` past tokens.
    """
    h, kv, d = layout.hidden_size, layout.num_kv_heads, layout.head_dim
    deep = layout.deepstack_layers
    if graph == EMBED:
        ranges = {"input_ids": {"min": [1, 1], "opt": [1, 1], "max": [1, max_context]},
                  "image_features": {"min": [0, h], "opt": [0, h], "max": [max_context, h]}}
        if deep:
            ranges["deepstack_features"] = {"min": [deep, 0, h], "opt": [deep, 0, h],
                                            "max": [deep, max_context, h]}
        return ranges
    if graph != DECODER:
        return {}
    ranges = {"inputs_embeds": {"min": [1, 1, h], "opt": [1, 1, h], "max": [1, max_context, h]},
              "attention_mask": {"min": [1, 1], "opt": [1, prompt + 1], "max": [1, max_context]},
              "position_ids": {"min": [3, 1, 1], "opt": [3, 1, 1], "max": [3, 1, max_context]}}
    if deep:
        ranges["deepstack_embeds"] = {"min": [deep, 1, 1, h], "opt": [deep, 1, 1, h],
                                      "max": [deep, 1, max_context, h]}
    for name in layout.past_names:
        ranges[name] = {"min": [1, kv, 0, d], "opt": [1, kv, prompt, d],
                        "max": [1, kv, max_context - 1, d]}
    return ranges


def _entry(path: Path, graph: str, precision: str, parity: dict, sha: str, command: str,
           ranges: dict | None = None, extra: dict | None = None) -> GraphEntry:
    inputs, outputs = vlm_graphs.io_specs(path)
    import transformers

    exporter = {"name": "rau_rt.export.vlm.export_vlm", "version": __version__,
                "command": command, **(extra or {})}
    return GraphEntry(graph=graph, file=path.name, backend="onnxruntime", precision=precision,
                      inputs=inputs, outputs=outputs, sha256=file_sha256(path),
                      source_checkpoint_sha256=sha, exporter=exporter,
                      tools=tool_versions(transformers=transformers.__version__),
                      parity=parity, dynamic_ranges=ranges or {})


class _Stages:
    """A progress bar over the export stages (tqdm, which transformers brings), with each
    stage's seconds and peak RSS. The process's high-water mark is reset as each stage starts
    (`reset_peak_rss`), so a stage's peak is its own; where the system cannot reset it,
    `peak_scope` says the peaks are the process's so far."""

    def __init__(self, names: list[str], show: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), disable=not show, unit="stage")
        self.times: dict[str, float] = {}
        self.peak_rss_mib: dict[str, float] = {}
        self.peak_scope = "stage"

    def next(self, name: str) -> None:
        if self.times:
            self.bar.update(1)
            self.peak_rss_mib[list(self.times)[-1]] = round(peak_rss_mib())
        release_freed_memory()  # what the last stage freed, before the next one allocates
        if not reset_peak_rss():
            self.peak_scope = "process so far"
        now = time.perf_counter()
        self.times[name] = now
        self.bar.set_description(name)

    def close(self) -> dict[str, float]:
        self.bar.update(1)
        self.bar.close()
        self.peak_rss_mib[list(self.times)[-1]] = round(peak_rss_mib())
        ends = [*list(self.times.values())[1:], time.perf_counter()]
        return {n: round(e - s, 3) for (n, s), e in zip(self.times.items(), ends, strict=True)}


def _write(out: Path, layout: VlmLayout, config: VlmExportConfig,
           made: dict[str, tuple[Path, dict]], paths: dict[str, Path],
           fp32: dict[str, object] | None, graph_parity: dict[str, dict] | None,
           sha: str | None = None, side: Sequence[str] = (),
           drop_reference: bool = False) -> Manifest:
    """manifest.json with the chosen precision's entry first per graph, then the fp32 one
    (none for a lowered graph with `drop_reference`: its fp32 file is deleted)."""
    prompt = int(fp32.get("prompt_tokens", 1)) if fp32 else 1
    size = "x".join(map(str, layout.input_size))
    extra = {layout.vision_graph(s): {"input_size": "x".join(map(str, s)),
                                      "grid_thw": "x".join(map(str, layout.grid_for(s))),
                                      "layout": "vlm.json"} for s in layout.sizes}
    entries = []
    for graph in (*layout.vision_graphs, EMBED, DECODER):
        ranges = _ranges(layout, graph, max(prompt, 1), config.max_context) or None
        if graph in made:
            target, parity = made[graph]
            precision = target.name.split(".")[1]
            if drop_reference and graph == DECODER and fp32 is not None:
                # the fp32 graphs' verification against transformers, kept without their files
                parity = {**parity, "fp32_end_to_end": {
                    k: v for k, v in fp32.items() if not k.startswith("_")}}
            entries.append(_entry(target, graph, precision, parity, sha, config.command, ranges,
                                  extra.get(graph)))
            if drop_reference:
                continue
        parity = dict((graph_parity or {}).get(graph, {}))
        if graph == DECODER and fp32 is not None:
            parity["end_to_end"] = {k: v for k, v in fp32.items() if not k.startswith("_")}
        entries.append(_entry(paths[graph], graph, "fp32", parity, sha, config.command, ranges,
                              extra.get(graph)))
    manifest = Manifest(name=f"vlm-{layout.family}-{size}", graphs=tuple(entries),
                        files=side_files(out, ["vlm.json", *side]))
    write_manifest(out, manifest)
    if drop_reference:  # after the manifest: an interrupted export leaves a loadable bundle
        for graph in made:
            paths[graph].unlink(missing_ok=True)
            paths[graph].with_name(paths[graph].name + ".data").unlink(missing_ok=True)
    return manifest


def copy_tokenizer(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer files (and chat template, generation config) into the bundle."""
    names = [*vlm_model.TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja",
             "chat_template.json", "generation_config.json", "vocab.json", "merges.txt"]
    copied = []
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    return copied


def export_vlm(config: VlmExportConfig) -> dict[str, object]:
    """Export, verify and quantize a Qwen-VL model into the bundle `config.out`.

    Returns:
        A summary: per-graph files, precisions, sizes and parity; preprocessing and end-to-end
        results; seconds per stage.

    Raises:
        InputError: an unsupported architecture, missing tokenizer files or weights.
        ParityError: a graph, the preprocessing or the greedy tokens outside tolerance.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(["load", "preprocess", "export", "reference", "verify", "quantize",
                      "write"], config.progress)
    with tempfile.TemporaryDirectory() as tmp:
        stages.next("load")
        source = (Path(config.model) if config.model is not None else
                  vlm_model.build_random(Path(tmp), config.random_init, config.family))
        model, tokenizer, fam = vlm_model.load(source, stored_dtype=True)
        memory = memory_record(model)
        sha = checkpoint_sha256(source)
        layout = make_layout(model, fam.name, config.input_size, config.hidden_state,
                             config.aspect_buckets)
        tokenizer_files = copy_tokenizer(source, out)
        write_layout(out, layout)

        stages.next("preprocess")
        images = vlm_verify.sample_images(layout.input_size)
        ids, patches = vlm_verify.runtime_inputs(images, layout, out / "tokenizer.json")
        hf = vlm_verify.hf_inputs(images, tokenizer, fam)
        hf_pixels = hf["pixel_values"].numpy()
        preprocess = {
            "patch_max_abs": float(np.max(np.abs(np.concatenate(patches) - hf_pixels)))
            if hf_pixels.shape == (len(patches) * patches[0].shape[0], layout.patch_dim)
            else None,
            "input_ids_equal": bool(np.array_equal(ids, hf["input_ids"].numpy())),
            "grid_thw": hf["image_grid_thw"].tolist(), "prompt_tokens": int(ids.shape[1])}
        if (preprocess["patch_max_abs"] is None or preprocess["patch_max_abs"] > VLM_PATCH_ATOL
                or not preprocess["input_ids_equal"]):
            raise ParityError(f"runtime preprocessing disagrees with transformers' processor "
                              f"(patch atol {VLM_PATCH_ATOL}, ids must be identical): "
                              f"{preprocess}")

        stages.next("export")
        started = time.perf_counter()
        paths, checks, layer_inputs = vlm_stages.export_fp32(model, layout, out, ids, patches)
        export_s = time.perf_counter() - started

        stages.next("reference")
        eager = vlm_stages.eager_reference(model, hf, config.new_tokens)
        # Every check from here on reads ONNX Runtime sessions and the references computed
        # above; the model would only sit beside them (the next stage hands its memory back).
        del model, hf

        stages.next("verify")
        # no session holds more than half the bound: a decoder over it is checked in parts
        graph_parity = vlm_stages.check_fp32(paths, checks, layer_inputs,
                                             max_part_mib=memory["bound_mib"] / 2)
        graph_parity[VISION]["preprocess"] = preprocess
        _write(out, layout, config, {}, paths, None, graph_parity, sha, tokenizer_files)
        fp32_mib = sum(vlm_stages.graph_mib(paths[g]) for g in paths)
        if config.precision == "fp32" or fp32_mib <= memory["bound_mib"]:
            fp32 = vlm_stages.end_to_end(out, layout, ids, patches, config.new_tokens, eager)
        else:
            fp32 = {"prompt_tokens": int(ids.shape[1]), "reference_tokens": eager["tokens"],
                    "skipped": f"the fp32 graphs ({fp32_mib:.0f} MiB) exceed the export's "
                               f"memory bound ({memory['bound_mib']:.0f} MiB); each was "
                               f"checked against eager on its own and the {config.precision} "
                               f"decoder is checked end to end against transformers"}

        stages.next("quantize")
        chosen = GRAPH_PRECISION[config.precision]
        made = vlm_stages.quantize_graphs(out, layout, chosen, paths, checks, config.block_size,
                                          config.quantize_lm_head, config.int8_method)
        if DECODER in made:
            _write(out, layout, config, made, paths, fp32, graph_parity, sha, tokenizer_files)
            made[DECODER][1].update(vlm_stages.decoder_drift(out, layout, chosen[DECODER], ids,
                                                             patches, eager))

        stages.next("write")
        manifest = _write(out, layout, config, made, paths, fp32, graph_parity, sha,
                          tokenizer_files, drop_reference=not config.keep_reference)
    times = stages.close()
    return {"bundle": str(out), "family": fam.name, "input_size": list(layout.input_size),
            "aspect_buckets": [list(b) for b in layout.buckets],
            "export_s": round(export_s, 3), "stage_s": times,
            # each stage's own peak RSS ("stage"; the high-water mark is reset as it starts,
            # which a caller that reads the process's peak after an export should know), or,
            # where Linux cannot reset it, the process's so far
            "stage_peak_rss_mib": stages.peak_rss_mib, "stage_peak_scope": stages.peak_scope,
            "memory": memory,
            "preprocess": preprocess,
            "end_to_end": {k: v for k, v in fp32.items() if not k.startswith("_")},
            "tokenizer_files": tokenizer_files,
            "reference_dropped": [] if config.keep_reference else sorted(
                paths[g].name for g in made),
            "bundle_mb": round(sum(f.stat().st_size for f in out.iterdir() if f.is_file())
                               / 2**20, 2),
            "graphs": [{"graph": e.graph, "file": e.file, "precision": e.precision,
                        "mb": round((out / e.file).stat().st_size / 2**20, 2),
                        "parity": e.parity} for e in manifest.graphs]}


def format_summary(summary: dict[str, object]) -> str:
    """The table `rau-rt export vlm` prints."""
    e2e = summary["end_to_end"]
    lines = [f"bundle {summary['bundle']} ({summary['family']}, input "
             f"{summary['input_size'][0]}x{summary['input_size'][1]}"
             + "".join(f", {h}x{w}" for h, w in summary.get("aspect_buckets", ()))
             + ", fp32 export "
             f"{summary['export_s']:.1f} s)",
             f"preprocess: patches max abs {summary['preprocess']['patch_max_abs']:.1e}, "
             f"input ids identical: {summary['preprocess']['input_ids_equal']}",
             (f"fp32 end to end: skipped: {e2e['skipped']}" if "skipped" in e2e else
              f"fp32 end to end: prefill logits max abs {e2e['prefill_logits_max_abs']:.1e}, "
              f"greedy {len(e2e['tokens'])} tokens identical to generate: "
              f"{e2e['tokens'] == e2e['reference_tokens']}"),
             "| graph | precision | file | MB | drift vs fp32 reference |",
             "|---|---|---|---|---|"]
    for g in summary["graphs"]:
        parity = g["parity"] or {}
        if "top1_agreement" in parity:
            drift = (f"logit cos {parity['prefill_logits_cosine']:.5f}, top-1 "
                     f"{parity['top1_agreement']:.2f} over {parity['positions']}")
        elif "outputs" in parity:
            drift = ", ".join(f"{n} max abs {o['max_abs']:.1e} cos {o['cosine']:.5f}"
                              for n, o in parity["outputs"].items() if n in (
                                  "image_features", "deepstack_features", "inputs_embeds",
                                  "deepstack_embeds", "logits"))
        else:
            drift = "-"
        lines.append(f"| {g['graph']} | {g['precision']} | {g['file']} | {g['mb']} | {drift} |")
    if summary.get("reference_dropped"):
        lines.append(f"verified fp32 graphs not kept (--keep-reference keeps them): "
                     f"{', '.join(summary['reference_dropped'])}")
    lines.append(f"bundle on disk: {summary['bundle_mb']} MB")
    peaks = summary["stage_peak_rss_mib"]
    memory = summary["memory"]
    lines.append(f"peak RSS {max(peaks.values())} MiB (bound {memory['bound_mib']:.0f} MiB: "
                 f"{memory['bound']}); at the end of each stage: "
                 + ", ".join(f"{stage} {mib}" for stage, mib in peaks.items()))
    return "\n".join(lines)
