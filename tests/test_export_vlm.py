"""`rau-rt export vlm` on a tiny random-init Qwen2.5-VL saved to a folder, as a user runs it.

The model folder (random weights, a local byte-level BPE with Qwen's special tokens) is built
once per module; the fp32 bundle is exported through the CLI, the int8 and int4 bundles through
the Python API. Greedy decoding through the bundle is compared with transformers' `generate`
here as well as inside the exporter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from rau_rt import cli
from rau_rt.bundle import load_bundle, read_manifest
from rau_rt.config import DEFAULT_ENGINE_CONFIG, EngineConfig
from rau_rt.errors import BundleError, InputError
from rau_rt.export import vlm
from rau_rt.export.command import _source_entry
from rau_rt.export.verify import ParityError
from rau_rt.export.vlm import model as vlm_model
from rau_rt.export.vlm import stages as vlm_stages
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.export.vlm import weights as vlm_weights
from rau_rt.vlm_layout import DECODER, EMBED, VISION, read_layout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return vlm_model.build_random(tmp_path_factory.mktemp("qwen25vl") / "model", "tiny")


@pytest.fixture(scope="module")
def fp32_bundle(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "fp32"
    assert cli.main(["export", "vlm", "--model", str(model_dir), "--input-size", "448",
                     "--precision", "fp32", "--hidden-state", "--out", str(out), "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def quantized(model_dir, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("quantized")
    # int8 keeps its verified fp32 graphs (--keep-reference); int4 holds only what runs
    return {p: vlm.export_vlm(vlm.VlmExportConfig(out=root / p, model=model_dir, precision=p,
                                                  keep_reference=p == "int8"))
            for p in ("int8", "int4")}


@pytest.fixture(scope="module")
def reference(model_dir, fp32_bundle):
    """transformers' inputs, last prefill logits and greedy tokens on the exporter's prompt."""
    model, tokenizer, fam = vlm_model.load(model_dir)
    layout = read_layout(fp32_bundle)
    images = vlm_verify.sample_images(layout.input_size)
    hf = vlm_verify.hf_inputs(images, tokenizer, fam)
    logits, tokens = vlm_verify.transformers_greedy(model, hf, NEW_TOKENS)
    return {"model": model, "hf": hf, "logits": logits, "tokens": tokens, "images": images}


def test_fp32_greedy_tokens_equal_generate(fp32_bundle, reference):
    layout = read_layout(fp32_bundle)
    ids, patches = vlm_verify.runtime_inputs(reference["images"], layout,
                                             fp32_bundle / "tokenizer.json")
    with load_bundle(fp32_bundle, config=EngineConfig(precision="fp32")) as bundle:
        tokens, logits = vlm_verify.greedy(bundle, layout, ids, patches, NEW_TOKENS,
                                           min_new_tokens=NEW_TOKENS)
    assert tokens == reference["tokens"]
    assert len(set(tokens)) > 5  # context-dependent output, so a broken KV cache would show
    assert np.max(np.abs(logits[0] - reference["logits"])) <= 1e-4


def test_runtime_inputs_match_the_hf_processor(fp32_bundle, reference):
    layout = read_layout(fp32_bundle)
    ids, patches = vlm_verify.runtime_inputs(reference["images"], layout,
                                             fp32_bundle / "tokenizer.json")
    hf = reference["hf"]
    np.testing.assert_array_equal(ids, hf["input_ids"].numpy())
    np.testing.assert_allclose(np.concatenate(patches), hf["pixel_values"].numpy(), atol=1e-5,
                               rtol=0)
    assert hf["image_grid_thw"].tolist() == [list(layout.grid_thw)] * 2


def test_rope_positions_match_get_rope_index(fp32_bundle, reference):
    from rau_rt.vlm_layout import decode_positions, rope_positions

    layout = read_layout(fp32_bundle)
    hf = reference["hf"]
    expected, delta = reference["model"].model.get_rope_index(
        hf["input_ids"], mm_token_type_ids=hf["mm_token_type_ids"],
        image_grid_thw=hf["image_grid_thw"])
    ids = hf["input_ids"].numpy()
    positions, ours = rope_positions(ids, layout)
    np.testing.assert_array_equal(positions, expected.numpy())
    assert ours == int(delta[0, 0])
    step = decode_positions(ids.shape[1], ours)
    assert step.shape == (3, 1, 1) and step[0, 0, 0] == ids.shape[1] + int(delta[0, 0])


def test_bundle_records_contract_tokenizer_and_parity(fp32_bundle):
    layout = read_layout(fp32_bundle)
    assert layout.input_size == (448, 448) and layout.grid_thw == (1, 32, 32)
    assert layout.tokens_per_image == 256 and layout.has_hidden_state
    manifest = read_manifest(fp32_bundle)
    assert manifest.graph_names == [VISION, EMBED, DECODER]
    vision = manifest.entries(VISION)[0]
    assert vision.exporter["input_size"] == "448x448"
    assert [s.shape for s in vision.inputs] == [(1024, layout.patch_dim)]
    decoder = manifest.entries(DECODER)[0]
    names = [s.name for s in decoder.inputs]
    assert names == ["inputs_embeds", "attention_mask", "position_ids", *layout.past_names]
    kv = {s.name: s for s in decoder.inputs}[layout.past_names[0]]
    assert kv.shape[1] == layout.num_kv_heads and kv.shape[3] == layout.head_dim
    assert [s.name for s in decoder.outputs][-1] == "last_hidden_state"
    e2e = decoder.parity["end_to_end"]
    assert e2e["passed"] and e2e["tokens"] == e2e["reference_tokens"]
    assert len(e2e["tokens"]) == NEW_TOKENS
    for entry in manifest.graphs:
        assert entry.parity["passed"], entry.graph
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (fp32_bundle / name).is_file()


def test_every_graphs_profile_is_consistent_and_runs(fp32_bundle, quantized):
    from conftest import assert_profiles_are_consistent

    assert assert_profiles_are_consistent(fp32_bundle) == 3  # vision, embed, decoder
    assert assert_profiles_are_consistent(Path(quantized["int4"]["bundle"])) >= 3


def test_quantized_bundles_record_drift(quantized):
    for precision, summary in quantized.items():
        bundle = Path(summary["bundle"])
        manifest = read_manifest(bundle)
        preferred = manifest.entries(DECODER)[0]
        assert preferred.precision == precision
        parity = preferred.parity
        assert 0.0 <= parity["top1_agreement"] <= 1.0 and parity["positions"] == NEW_TOKENS
        assert -1.0 <= parity["prefill_logits_cosine"] <= 1.0
        nodes = onnx.load(str(bundle / preferred.file)).graph.node
        # both decoders weight-only MatMulNBits (int8 by default), at their bit widths
        bits = {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "bits"}
        assert bits == {int(precision[3:])}
        assert "MatMulInteger" not in {n.op_type for n in nodes}
        # the vision tower dynamic int8 in both
        vision = manifest.entries(VISION)[0]
        vision_ops = {n.op_type for n in onnx.load(str(bundle / vision.file)).graph.node}
        assert vision.precision == "int8" and "MatMulInteger" in vision_ops
    decoder = {p: next(g for g in summary["graphs"] if g["graph"] == DECODER)
               for p, summary in quantized.items()}
    assert decoder["int8"]["parity"]["prefill_logits_cosine"] >= 0.99
    assert decoder["int8"]["parity"]["quantization"]["method"] == "weight-only"
    assert decoder["int4"]["parity"]["quantization"]["block_size"] == 32


def test_a_lowered_bundle_holds_what_runs_unless_asked_to_keep_the_reference(quantized):
    kept, lean = (Path(quantized[p]["bundle"]) for p in ("int8", "int4"))
    kept_manifest, lean_manifest = read_manifest(kept), read_manifest(lean)
    assert [e.precision for e in kept_manifest.entries(DECODER)] == ["int8", "fp32"]
    assert quantized["int8"]["reference_dropped"] == []
    # int4: the lowered graphs only, the embedding table in fp16 (gated against eager)
    assert [e.precision for e in lean_manifest.entries(DECODER)] == ["int4"]
    assert [e.precision for e in lean_manifest.entries(VISION)] == ["int8"]
    (embed,) = lean_manifest.entries(EMBED)
    assert embed.precision == "fp16" and embed.parity["passed"]
    assert quantized["int4"]["reference_dropped"] == ["vlm_decoder.fp32.onnx",
                                                      "vlm_embed.fp32.onnx",
                                                      "vlm_vision.fp32.onnx"]
    assert not any(lean.glob("*.fp32.onnx"))
    # what is on disk: the manifest's graphs, the tokenizer and the bundle's JSON, nothing else
    listed = {e.file for e in lean_manifest.graphs} | set(lean_manifest.files)
    assert {f.name for f in lean.iterdir()} - listed <= {"manifest.json"}
    # the fp32 graphs' verification against transformers stays on record
    e2e = lean_manifest.entries(DECODER)[0].parity["fp32_end_to_end"]
    assert e2e["tokens"] == e2e["reference_tokens"]
    with pytest.raises(BundleError, match="fp32"):
        load_bundle(lean, config=EngineConfig(precision="fp32"))
    with pytest.raises(BundleError, match="--keep-reference"):
        _source_entry(lean_manifest, DECODER, "fp16")  # what `rau-rt export trt` builds from


def test_the_summary_records_peak_rss_at_each_stage(quantized):
    peaks = quantized["int4"]["stage_peak_rss_mib"]
    assert list(peaks) == ["load", "preprocess", "export", "reference", "verify",
                           "quantize", "write"]
    # each stage's own peak: the high-water mark starts over as a stage starts, so a later
    # stage's peak can be below an earlier one's (the model is freed after `reference`)
    assert quantized["int4"]["stage_peak_scope"] == "stage" and min(peaks.values()) > 0
    assert f"peak RSS {max(peaks.values())} MiB" in vlm.format_summary(quantized["int4"])


def test_quantized_bundle_runs_and_keeps_lm_head_fp32(quantized):
    bundle = Path(quantized["int4"]["bundle"])
    layout = read_layout(bundle)
    model = onnx.load(str(bundle / "vlm_decoder.int4.onnx"))
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    lm_head = [n for n in model.graph.node if n.op_type == "MatMul"
               and shapes.get(n.input[1], (0,))[-1] == layout.vocab_size]
    assert len(lm_head) == 1  # kept fp32 (QuantizeConfig.quantize_lm_head False)
    with load_bundle(bundle) as loaded:
        assert loaded.entry(DECODER).precision == "int4"
        ids = np.array([[1, 20, 30]], np.int64)
        tokens, logits = vlm_verify.greedy(loaded, layout, ids, [], 3, min_new_tokens=3)
    assert len(tokens) == len(logits) == 3


def test_weights_stream_into_external_data_and_the_graphs_stay_exact(model_dir, tmp_path,
                                                                     monkeypatch):
    # every graph's weights to `<graph>.data`, as for a model over EXTERNAL_DATA_BYTES
    monkeypatch.setattr(vlm_weights, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(vlm_weights, "_BLOCK_BYTES", 300)  # weights written in several blocks
    opened: list[tuple[str, bool]] = []  # (graph file or bundle, prepack_weights)
    open_engine, open_bundle = vlm_stages.registry.open_engine, vlm_stages.load_bundle

    def engine_spy(path, backend=None, config=DEFAULT_ENGINE_CONFIG, **kwargs):
        opened.append((Path(path).name, config.prepack_weights))
        return open_engine(path, backend, config, **kwargs)

    def bundle_spy(path, config=DEFAULT_ENGINE_CONFIG, **kwargs):
        opened.append(("bundle", config.prepack_weights))
        return open_bundle(path, config=config, **kwargs)

    monkeypatch.setattr(vlm_stages.registry, "open_engine", engine_spy)
    monkeypatch.setattr(vlm_stages, "load_bundle", bundle_spy)
    summary = vlm.export_vlm(vlm.VlmExportConfig(out=tmp_path / "b", model=model_dir,
                                                 precision="int4"))
    # the fp32 checks map their weights (no prepacked copy); the lowered graphs and the int4
    # bundle's drift run as the runtime runs them
    assert {name: prepack for name, prepack in opened if ".fp32." in name} == {
        f"{g}.fp32.onnx": False for g in (VISION, EMBED, DECODER)}
    assert all(prepack for name, prepack in opened if ".int" in name)
    assert ("bundle", False) in opened and ("bundle", True) in opened  # fp32 run, int4 drift
    out = Path(summary["bundle"])
    # the int4 bundle dropped the fp32 graphs and their data files, kept the lowered ones
    assert not any(out.glob("*.fp32.onnx*"))
    assert summary["end_to_end"]["tokens"] == summary["end_to_end"]["reference_tokens"]
    fp32 = tmp_path / "fp32"
    vlm.export_vlm(vlm.VlmExportConfig(out=fp32, model=model_dir, precision="fp32"))
    decoder = onnx.load(str(fp32 / "vlm_decoder.fp32.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in decoder.graph.initializer)
    assert (fp32 / "vlm_decoder.fp32.onnx.data").stat().st_size > 0
    # Linear weights are stored transposed, with no Transpose left in front of a MatMul
    assert not any(n.op_type == "Transpose" and n.input[0] in {
        t.name for t in decoder.graph.initializer} for n in decoder.graph.node)
    assert any(t.name.endswith(".T") for t in decoder.graph.initializer)


def test_runtime_loop_needs_neither_torch_nor_transformers(fp32_bundle):
    code = f"""
import sys
sys.modules["torch"] = None; sys.modules["transformers"] = None
import numpy as np
from PIL import Image
from rau_rt.bundle import load_bundle
from rau_rt.config import DEFAULT_ENGINE_CONFIG, EngineConfig
from rau_rt.export.vlm import verify as vlm_verify
from rau_rt.vlm_layout import read_layout
bundle_dir = {str(fp32_bundle)!r}
layout = read_layout(bundle_dir)
images = vlm_verify.sample_images(layout.input_size)
ids, patches = vlm_verify.runtime_inputs(images, layout, bundle_dir + "/tokenizer.json")
with load_bundle(bundle_dir, config=EngineConfig(precision="fp32")) as bundle:
    tokens, _ = vlm_verify.greedy(bundle, layout, ids, patches, {NEW_TOKENS},
                                  min_new_tokens={NEW_TOKENS})
print(tokens)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    expected = read_manifest(fp32_bundle).entries(DECODER)[0].parity["end_to_end"]["tokens"]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_unsupported_architecture_is_named(model_dir, tmp_path, capsys):
    folder = tmp_path / "llama"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    assert cli.main(["export", "vlm", "--model", str(folder), "--out",
                     str(tmp_path / "b")]) == 1
    error = capsys.readouterr().err
    assert "LlamaForCausalLM" in error and "Qwen2_5_VLForConditionalGeneration" in error


def test_missing_tokenizer_is_named(model_dir, tmp_path):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(InputError, match=r"tokenizer files missing: \['tokenizer.json'\]"):
        vlm.export_vlm(vlm.VlmExportConfig(out=tmp_path / "b", model=folder))


def test_input_size_must_fit_the_patch_grid(model_dir, tmp_path):
    with pytest.raises(InputError, match="multiple of 28"):
        vlm.export_vlm(vlm.VlmExportConfig(out=tmp_path / "b", model=model_dir,
                                           input_size=450))


def test_qwen2_vl_family_exports_through_the_same_adapter(tmp_path):
    out = tmp_path / "qwen2vl"
    assert cli.main(["export", "vlm", "--random-init", "tiny", "--family", "qwen2_vl",
                     "--out", str(out), "--json"]) == 0
    layout = read_layout(out)
    assert layout.family == "qwen2_vl" and layout.family_constants.box_convention == (
        "relative_1000")
    e2e = read_manifest(out).entries(DECODER)[0].parity["end_to_end"]
    assert e2e["passed"] and e2e["tokens"] == e2e["reference_tokens"]


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory) -> Path:
    """The micro VLM (hidden 256: eight 32-value blocks per row) with two outlier channels per
    norm, 100x: the same function as the random model, outliers in its MatMuls' inputs."""
    root = tmp_path_factory.mktemp("outliers")
    model = vlm_model.build_random(root / "micro", "micro")
    return vlm_model.add_outlier_channels(model, root / "micro-outliers", channels=2,
                                          scale=100.0)


def test_outlier_channels_keep_the_function(outlier_model):
    plain, _, _ = vlm_model.load(outlier_model.parent / "micro")
    shifted, _, _ = vlm_model.load(outlier_model)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.inference_mode():
        expected, got = plain(input_ids=ids).logits, shifted(input_ids=ids).logits
        hidden = shifted.model.language_model.layers[0].input_layernorm(
            shifted.model.language_model.embed_tokens(ids))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    magnitude = hidden.abs().amax(dim=(0, 1))
    assert (magnitude > 20 * magnitude.median()).sum() == 2  # the two outlier channels


def test_dynamic_int8_is_refused_on_outlier_channels_and_weight_only_passes(outlier_model,
                                                                             tmp_path):
    with pytest.raises(ParityError, match="--int8-method weight-only"):
        vlm.export_vlm(vlm.VlmExportConfig(out=tmp_path / "dynamic", model=outlier_model,
                                           precision="int8", int8_method="dynamic"))
    summary = vlm.export_vlm(vlm.VlmExportConfig(out=tmp_path / "weight-only",
                                                 model=outlier_model, precision="int8"))
    decoder = next(g for g in summary["graphs"] if g["graph"] == DECODER)
    assert decoder["precision"] == "int8" and decoder["parity"]["passed"]
    assert decoder["parity"]["prefill_logits_cosine"] >= 0.99
    assert decoder["parity"]["quantization"]["method"] == "weight-only"


@pytest.mark.parametrize("bits", [4, 8])
def test_streamed_nbits_quantization_equals_onnxruntimes_quantizer(fp32_bundle, tmp_path, bits,
                                                                   monkeypatch):
    import logging

    # its module calls logging.basicConfig(level=INFO) at import; keep the root logger as it was
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from rau_rt.export.vlm.quantize import QuantizeConfig, lm_head_nodes, quantize

    source = fp32_bundle / "vlm_decoder.fp32.onnx"
    layout = read_layout(fp32_bundle)
    ours = quantize(source, tmp_path / "ours.onnx", QuantizeConfig(f"int{bits}"),
                    vocab_size=layout.vocab_size)
    model = onnx.load(str(source))
    theirs = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True,
                                  accuracy_level=4,
                                  nodes_to_exclude=lm_head_nodes(model, layout.vocab_size))
    theirs.process()
    a, b = onnx.load(str(ours)), theirs.model.model
    nbits = [n for n in a.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == sum(n.op_type == "MatMulNBits" for n in b.graph.node) > 0
    assert sorted(n.op_type for n in a.graph.node) == sorted(n.op_type for n in b.graph.node)
    mine = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    for node in nbits:  # identical packed weights and scales
        for name in node.input[1:]:
            np.testing.assert_array_equal(mine[name], reference[name])


@pytest.mark.parametrize("per_channel", [False, True])
def test_streamed_dynamic_int8_equals_onnxruntimes_quantize_dynamic(fp32_bundle, tmp_path,
                                                                    per_channel):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from rau_rt.export.vlm.quantize import QuantizeConfig, quantize

    source = fp32_bundle / "vlm_vision.fp32.onnx"
    ours = quantize(source, tmp_path / "ours.onnx",
                    QuantizeConfig("int8", method="dynamic", per_channel=per_channel))
    quantize_dynamic(str(source), str(tmp_path / "theirs.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], per_channel=per_channel,
                     extra_options={"MatMulConstBOnly": True})
    a, b = onnx.load(str(ours)), onnx.load(str(tmp_path / "theirs.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in a.graph.node) > 0
    assert sorted(n.op_type for n in a.graph.node) == sorted(n.op_type for n in b.graph.node)
    mine = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    theirs = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert sorted(mine) == sorted(theirs)
    for name, value in theirs.items():  # identical int8 weights, scales and zero points
        np.testing.assert_array_equal(mine[name], value, err_msg=name)
    layout = read_layout(fp32_bundle)
    feeds = {"pixel_values": np.random.default_rng(0).normal(
        size=(layout.grid_thw[1] * layout.grid_thw[2], layout.patch_dim)).astype(np.float32)}
    import onnxruntime

    outputs = [onnxruntime.InferenceSession(str(path)).run(None, feeds)[0]
               for path in (ours, tmp_path / "theirs.onnx")]
    np.testing.assert_array_equal(*outputs)


@pytest.fixture(scope="module")
def bf16_model_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model stored in bf16, as released Qwen checkpoints are."""
    out = tmp_path_factory.mktemp("bf16") / "model"
    model, _, _ = vlm_model.load(model_dir)
    model.to(torch.bfloat16).save_pretrained(out)
    for file in model_dir.iterdir():
        if file.is_file() and not (out / file.name).exists() and file.suffix != ".safetensors":
            shutil.copyfile(file, out / file.name)
    return out


def test_a_model_held_in_bf16_computes_in_fp32_as_the_model_loaded_in_fp32(bf16_model_dir):
    held, tokenizer, fam = vlm_model.load(bf16_model_dir, stored_dtype=True)
    loaded, _, _ = vlm_model.load(bf16_model_dir)
    assert {p.dtype for p in held.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    hf = vlm_verify.hf_inputs(vlm_verify.sample_images((448, 448)), tokenizer, fam)
    expected = vlm_verify.transformers_reference(loaded, hf, 8)
    with vlm_model.fp32_compute(held):
        got = vlm_verify.transformers_reference(held, hf, 8)
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1] == expected[1]
    np.testing.assert_array_equal(np.stack(got[2]), np.stack(expected[2]))
    # and the context leaves the model as it was
    assert {p.dtype for p in held.parameters()} == {torch.bfloat16}
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in held.modules())
    with torch.inference_mode():  # outside it, the model computes in bf16 again
        plain = held(**hf).logits[0, -1]
    assert plain.dtype == torch.bfloat16


def test_a_bf16_checkpoint_exports_exact_fp32_graphs_and_records_its_memory(bf16_model_dir,
                                                                            tmp_path):
    summary = vlm.export_vlm(vlm.VlmExportConfig(out=tmp_path / "b", model=bf16_model_dir,
                                                 precision="int4", keep_reference=True))
    e2e = summary["end_to_end"]
    assert e2e["passed"] and e2e["tokens"] == e2e["reference_tokens"]
    manifest = read_manifest(tmp_path / "b")
    for entry in manifest.entries(DECODER) + manifest.entries(VISION):
        assert entry.parity["passed"], entry.precision
    # the graphs hold the stored weights upcast: bf16 values exactly
    decoder = onnx.load(str(tmp_path / "b" / "vlm_decoder.fp32.onnx"))
    weight = next(onnx.numpy_helper.to_array(t) for t in decoder.graph.initializer
                  if t.name.endswith("q_proj.weight.T"))
    assert weight.dtype == np.float32
    np.testing.assert_array_equal(weight, torch.tensor(weight).bfloat16().float().numpy())
    memory = summary["memory"]
    model, _, _ = vlm_model.load(bf16_model_dir)
    assert memory["parameters"] == sum(p.numel() for p in model.parameters())
    assert memory["bound_mib"] == pytest.approx(1.5 * memory["bf16_mib"] + 2048, abs=0.1)


def test_io_specs_read_from_the_graph_equal_onnxruntimes(fp32_bundle, quantized):
    from rau_rt.engines import registry
    from rau_rt.export.vlm.graphs import io_specs

    files = [fp32_bundle / e.file for e in read_manifest(fp32_bundle).graphs]
    bundle = Path(quantized["int4"]["bundle"])
    files += [bundle / e.file for e in read_manifest(bundle).graphs]
    for path in files:
        with registry.open_engine(path, "onnxruntime", precision=path.name.split(".")[1]) as e:
            assert io_specs(path) == (e.inputs, e.outputs), path.name


def test_a_decoder_over_the_part_budget_is_checked_in_parts_that_catch_a_bad_layer(model_dir,
                                                                                   tmp_path):
    from rau_rt.export.vlm import exporter
    from rau_rt.export.vlm import stages as vlm_stages

    model, _, fam = vlm_model.load(model_dir, stored_dtype=True)
    layout = exporter.make_layout(model, fam.name, 448, False)
    ids, patches = vlm_verify.runtime_inputs(vlm_verify.sample_images(layout.input_size),
                                             layout, model_dir / "tokenizer.json")
    paths, checks, layer_inputs = vlm_stages.export_fp32(model, layout, tmp_path, ids, patches)
    assert len(layer_inputs) == layout.num_layers
    whole = vlm_stages.check_fp32(paths, checks, layer_inputs)[DECODER]
    parts = vlm_stages.check_fp32(paths, checks, layer_inputs, max_part_mib=1e-3)[DECODER]
    assert "parts" not in whole
    assert parts["parts"] == [{"layers": [0, 1], "passed": True},
                              {"layers": [1, 2], "passed": True}]
    # every output the whole graph has, plus the hidden state between the parts
    assert set(whole["outputs"]) < set(parts["outputs"])
    assert not list(tmp_path.glob("*.layers-*"))  # the parts' graphs are deleted
    # a weight of the second layer off by 1 %: the second part fails, the first still passes
    graph = onnx.load(str(paths[DECODER]))
    weight = next(t for t in graph.graph.initializer if "layers.1.mlp.down_proj" in t.name)
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.01,
                                                 weight.name))
    onnx.save(graph, str(paths[DECODER]))
    with pytest.raises(ParityError) as failed:
        vlm_stages.check_fp32(paths, checks, layer_inputs, max_part_mib=1e-3)
    assert "decoder layers 1 differ" in str(failed.value)  # the second run only


def test_an_export_over_its_memory_bound_checks_in_parts_and_skips_the_fp32_bundle_run(
        model_dir, tmp_path, monkeypatch):
    from rau_rt.export.vlm import exporter

    record = exporter.memory_record
    # a bound below the tiny model's graphs: as a 3B-class export on a 13 GB bound
    monkeypatch.setattr(exporter, "memory_record",
                        lambda model: {**record(model), "bound_mib": 0.2})
    summary = vlm.export_vlm(vlm.VlmExportConfig(out=tmp_path / "b", model=model_dir,
                                                 precision="int4"))
    assert "exceed the export's memory bound" in summary["end_to_end"]["skipped"]
    assert "fp32 end to end: skipped" in vlm.format_summary(summary)
    (decoder,) = read_manifest(tmp_path / "b").entries(DECODER)
    assert decoder.precision == "int4"
    assert "skipped" in decoder.parity["fp32_end_to_end"]
    # the int4 decoder is still measured end to end against transformers
    assert decoder.parity["positions"] == NEW_TOKENS and decoder.parity["top1_agreement"] > 0
    assert "transformers eager fp32" in decoder.parity["reference"]


@pytest.mark.slow
def test_the_small_class_int4_export_stays_within_its_memory_bound(tmp_path):
    """The 0.5B-class model (bf16 on disk, 1.5 GiB) exported in its own process, as a user runs
    it: peak RSS within 1.5x its bf16 bytes + 2 GiB, and a bundle of what runs only."""
    model, out = tmp_path / "small", tmp_path / "bundle"
    subprocess.run([sys.executable, "-c", "import sys; from rau_rt.export.vlm.model import "
                    "build_random; build_random(sys.argv[1], 'small')", str(model)], check=True,
                   capture_output=True)
    done = subprocess.run([sys.executable, "-m", "rau_rt", "export", "vlm", "--model",
                           str(model), "--precision", "int4", "--out", str(out), "--json"],
                          capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    assert max(summary["stage_peak_rss_mib"].values()) <= summary["memory"]["bound_mib"]
    assert summary["end_to_end"]["passed"]  # the fp32 graphs fit the bound: run whole
    manifest = read_manifest(out)
    graphs = [out / e.file for e in manifest.graphs]
    kept = sum(f.stat().st_size for f in graphs) + sum(
        data.stat().st_size for f in graphs if (data := vlm_weights.data_file(f)).is_file())
    on_disk = sum(f.stat().st_size for f in out.iterdir())
    assert on_disk - kept < 1 << 20  # the rest: tokenizer and JSON


@pytest.mark.parametrize("graph", [EMBED, DECODER])
def test_streamed_fp16_conversion_equals_the_converter_on_the_whole_graph(fp32_bundle, tmp_path,
                                                                          monkeypatch, graph):
    from rau_rt.export.trt_build import FP32_SENSITIVE_OPS, convert_fp16
    from rau_rt.export.vlm import fp16 as vlm_fp16

    # weights to `<graph>.data` and written in several blocks, as for a 3B-class graph
    monkeypatch.setattr(vlm_weights, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(vlm_weights, "_BLOCK_BYTES", 300)
    layout = read_layout(fp32_bundle)
    source = fp32_bundle / f"{graph}.fp32.onnx"
    ours = tmp_path / "ours.onnx"
    vlm_fp16.convert(source, ours, graph, layout)
    assert vlm_weights.data_file(ours).stat().st_size > 0
    model = onnx.load(str(source))
    keep = [v.name for v in (*model.graph.input, *model.graph.output)
            if v.name not in vlm_fp16.float16_io(graph, layout)]
    theirs = convert_fp16(source, tmp_path / "theirs.onnx", keep_fp32=FP32_SENSITIVE_OPS,
                          keep_fp32_nodes=vlm_fp16.fp32_nodes(model), keep_io_types=keep)
    a, b = onnx.load(str(ours)), onnx.load(str(theirs))
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    mine = {t.name: onnx.numpy_helper.to_array(t, str(tmp_path)) for t in a.graph.initializer}
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert sorted(mine) == sorted(reference)
    for name, value in reference.items():
        assert mine[name].dtype == value.dtype, name
        np.testing.assert_array_equal(mine[name], value, err_msg=name)


def test_a_qwen3_vl_decoder_checks_in_parts_across_its_deepstack_adds(tmp_path):
    from rau_rt.export.vlm import exporter
    from rau_rt.export.vlm import stages as vlm_stages

    # the hidden state entering layers 1 and 2 is the deepstack add's, outside the layers
    source = vlm_model.build_random(tmp_path / "model", "tiny", "qwen3_vl")
    model, _, fam = vlm_model.load(source, stored_dtype=True)
    layout = exporter.make_layout(model, fam.name, 224, False)
    ids, patches = vlm_verify.runtime_inputs(vlm_verify.sample_images(layout.input_size),
                                             layout, source / "tokenizer.json")
    paths, checks, layer_inputs = vlm_stages.export_fp32(model, layout, tmp_path, ids, patches)
    parity = vlm_stages.check_fp32(paths, checks, layer_inputs, max_part_mib=1e-4)[DECODER]
    assert parity["parts"] == [{"layers": [k, k + 1], "passed": True} for k in range(3)]
