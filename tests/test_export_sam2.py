"""`rau-rt export sam2`: four graphs and memory attention's pooled and windowed variants written,
reloaded through rau_rt.engines and verified.

The micro model is exported once per image size (module fixtures): at 256 px from a random
checkpoint in Meta's format through the CLI (the user's path), at 512 px with int8. Random
weights give small logits, so the checks compare logits (max error, sign flips) and compute
mask IoU only on masks covering 1-60 % of the map (random-init models get a presence bias).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import time

import numpy as np
import onnx
import pytest
import torch

from rau_rt import cli
from rau_rt.bundle import file_sha256, load_bundle
from rau_rt.errors import InputError
from rau_rt.export import quantize as int8
from rau_rt.export import sam2
from rau_rt.export.sam2 import exporter
from rau_rt.export.sam2 import graphs as sam2_graphs
from rau_rt.export.sam2.inputs import CheckFrames, build_inputs, to_numpy
from rau_rt.export.sam2.model import ModelSource, load_model, random_model
from rau_rt.export.verify import Tolerance
from rau_rt.synthetic import generate_sequence

GRAPHS = set(sam2_graphs.GRAPH_NAMES)


@functools.cache
def check_frames() -> CheckFrames:
    """3 synthetic angiography frames with the boxes of the 2 largest segments."""
    return CheckFrames.synthetic(generate_sequence, regions=2)


def _manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


@pytest.fixture(scope="module")
def micro256(tmp_path_factory):
    """CLI export of a random micro checkpoint in Meta's format: (bundle, checkpoint, stdout)."""
    root = tmp_path_factory.mktemp("sam2_micro256")
    checkpoint = root / "micro.pt"
    torch.save({"model": random_model("micro", 256, seed=1).state_dict()}, checkpoint)
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["export", "sam2", "--checkpoint", str(checkpoint), "--config", "micro",
                         "--image-size", "256", "--precision", "fp32", "--out",
                         str(root / "bundle")])
    assert code == 0
    print(f"micro 256 fp32 export: {time.perf_counter() - started:.1f} s")
    return root / "bundle", checkpoint, out.getvalue()


@pytest.fixture(scope="module")
def micro256_eager(micro256):
    """The eager model, wrappers and verification inputs of the micro256 bundle's checkpoint."""
    _, checkpoint, _ = micro256
    model = load_model(ModelSource(image_size=256, checkpoint=checkpoint, config="micro"))
    modules = sam2_graphs.graph_modules(model)
    return model, modules, build_inputs(model, modules, check_frames())


def _reference(modules, graph, example):
    with torch.no_grad():
        result = modules[graph](*example.values())
    result = result if isinstance(result, tuple) else (result,)
    return {name: t.numpy() for name, t in zip(sam2_graphs.OUTPUTS[graph], result, strict=True)}


def _copy_fp32(bundle, graph, directory):
    """The standard (TensorRT-source) fp32 graph of `graph`, copied into `directory`."""
    entry = next(e for e in load_bundle(bundle).manifest.graphs
                 if e.graph == graph and e.exporter.get("variant") is None)
    (directory / entry.file).write_bytes((bundle / entry.file).read_bytes())
    return entry


@pytest.fixture(scope="module")
def micro512_int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("sam2_micro512") / "bundle"
    config = sam2.Sam2ExportConfig(ModelSource(image_size=512, random_init="micro"), out,
                                   precision="int8")
    manifest, rows = sam2.export_sam2(config, check_frames())
    return out, manifest, rows


def _check_fp32_entries(entries, size):
    for entry in entries:
        parity = entry["parity"]
        assert parity["passed"], entry["graph"]
        assert max(o["max_abs"] for o in parity["outputs"].values()) <= 1e-4
        fused = entry["exporter"].get("variant") == "fused-attention"
        # the fused variants hold ONNX Runtime's MultiHeadAttention, which TensorRT cannot parse
        assert entry["lint"]["tensorrt_ready"] != fused, (entry["graph"], entry["lint"])
        assert entry["exporter"]["image_size"] == str(size)
        assert entry["exporter"]["contract"] == sam2_graphs.CONTRACT[entry["graph"]]
    decoder = next(e for e in entries if e["graph"] == "mask_decoder")
    masks = decoder["parity"]["masks"]
    assert masks["masks_compared"] >= 2 and masks["iou"] >= 0.999
    assert masks["sign_flip_fraction"] <= 1e-3


def test_cli_exports_the_verified_fp32_graphs(micro256):
    bundle, checkpoint, stdout = micro256
    manifest = _manifest(bundle)
    assert manifest["name"] == "sam2-micro-256"
    entries = manifest["graphs"]
    assert {e["graph"] for e in entries} == GRAPHS and len(entries) == 10
    assert {e["precision"] for e in entries} == {"fp32"}
    # ONNX Runtime takes each graph's first entry: the fused-attention variant where there is one
    assert [(e["graph"], e["exporter"].get("variant")) for e in entries] == [
        ("image_encoder", "fused-attention"), ("image_encoder", None), ("mask_decoder", None),
        ("memory_attention", "fused-attention"), ("memory_attention", None),
        ("memory_encoder", None), ("memory_attention_pooled", "fused-attention"),
        ("memory_attention_pooled", None), ("memory_attention_window", "fused-attention"),
        ("memory_attention_window", None)]
    assert manifest["files"] == {"sam2.json": file_sha256(bundle / "sam2.json")}
    _check_fp32_entries(entries, 256)
    for entry in entries:
        assert entry["source_checkpoint_sha256"] == file_sha256(checkpoint)
        assert entry["exporter"]["command"].startswith("rau-rt export sam2 --checkpoint")
    for attention in (e for e in entries if e["graph"].startswith("memory_attention")):
        # regions 1..16; memories 1..10 and pointers 1..19 (4 conditioning frames + 6 / 15
        # recent), TensorRT's optimum at sam2's steady state (7 and 16)
        assert attention["dynamic_ranges"]["memory"] == {"min": [1, 1, 32, 16, 16],
                                                         "opt": [2, 7, 32, 16, 16],
                                                         "max": [16, 10, 32, 16, 16]}
        assert attention["dynamic_ranges"]["pointer_position"] == {
            "min": [1, 1], "opt": [2, 16], "max": [16, 19]}
        assert [s["shape"] for s in attention["inputs"] if s["name"] == "memory"] == [
            ["regions", "memory_slots", 32, 16, 16]]
    window = next(e for e in entries if e["graph"] == "memory_attention_window")
    # each region's window: a quarter of the 16 x 16 grid
    assert [s["shape"] for s in window["inputs"] if s["name"] == "window_index"] == [
        ["regions", 64]]
    assert [s["shape"] for s in window["outputs"]] == [["regions", 128, 8, 8]]
    assert "graph" in stdout and "IoU" in stdout
    assert stdout.count("ORT only (fused)") == 4 and "errors" not in stdout
    for graph in GRAPHS:
        assert graph in stdout


def test_bundle_runs_tracking_frames_and_one_region_like_eager(micro256, micro256_eager):
    """The dynamic dims: 1 region, 1 point (a tracked frame), through load_bundle."""
    bundle = micro256[0]
    _, modules, inputs = micro256_eager
    one = {graph: {name: (t[:1] if name in exporter.DYNAMIC[graph] else t)
                   for name, t in inputs.calibration[graph][-1].items()}
           for graph in ("mask_decoder", "memory_attention", "memory_encoder",
                         "memory_attention_window")}
    assert one["mask_decoder"]["point_coords"].shape == (1, 1, 2)
    with load_bundle(bundle) as loaded:
        for graph, feeds in one.items():
            expected = _reference(modules, graph, feeds)
            got = loaded.run(graph, to_numpy(feeds))
            for name, value in expected.items():
                assert np.abs(got[name] - value).max() <= 1e-4, (graph, name)


def test_int8_bundle_records_each_graphs_precision(micro512_int8):
    bundle, _, rows = micro512_int8
    manifest = _manifest(bundle)
    by_graph = {g: [e for e in manifest["graphs"] if e["graph"] == g] for g in GRAPHS}
    _check_fp32_entries([e for e in manifest["graphs"] if e["precision"] == "fp32"], 512)
    for graph, entries in by_graph.items():
        first, standard = entries[0], entries[-1]
        assert standard["precision"] == "fp32" and "variant" not in standard["exporter"]
        fp32 = [e for e in entries if e["precision"] == "fp32"]
        # dynamic int8 is ONNX Runtime's: it comes from the fused graph where there is one
        source = fp32[0]
        assert (source["exporter"].get("variant") == "fused-attention") == (
            graph in exporter.FUSED_ATTENTION_GRAPHS)
        if first["precision"] == "int8":
            assert len(entries) == len(fp32) + 1
            assert first["parity"]["passed"] and first["exporter"]["int8_method"] == "dynamic"
            assert first["exporter"].get("variant") == source["exporter"].get("variant")
            assert min(o["cosine"] for o in first["parity"]["outputs"].values()) >= 0.999
            if graph == "mask_decoder":
                assert first["parity"]["masks"]["iou"] >= 0.98
            assert source["exporter"]["precision_choice"].startswith("int8 first")
        else:  # kept fp32, and the manifest says why
            assert len(entries) == len(fp32)
            assert source["exporter"]["precision_choice"].startswith("fp32: int8 (dynamic) "
                                                                     "rejected")
            assert source["parity"]["int8_rejected"]["passed"] is False
    # the image encoder and memory attention are matmul-heavy: dynamic int8 keeps them; the
    # memory encoder has no MatMul (convolutions stay fp32)
    assert by_graph["image_encoder"][0]["precision"] == "int8"
    assert by_graph["memory_attention"][0]["precision"] == "int8"
    for entry in manifest["graphs"]:
        if entry["precision"] == "int8":
            ops = {n.op_type for n in onnx.load(str(bundle / entry["file"])).graph.node}
            assert "MatMulInteger" in ops and "ConvInteger" not in ops, entry["graph"]
    assert {(r.graph, r.precision) for r in rows} == {
        (e["graph"], e["precision"]) for e in manifest["graphs"]}
    with load_bundle(bundle) as loaded:
        for graph in GRAPHS:
            assert loaded.entry(graph).precision == by_graph[graph][0]["precision"]


def test_int8_over_tolerance_stays_fp32(micro256, micro256_eager, monkeypatch, tmp_path):
    _, modules, inputs = micro256_eager
    example = inputs.example["memory_attention"]
    entry = _copy_fp32(micro256[0], "memory_attention", tmp_path)
    impossible = Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0)
    monkeypatch.setitem(exporter.SAM2_TOLERANCES, "int8", impossible)
    config = sam2.Sam2ExportConfig(ModelSource(image_size=256, random_init="micro"), tmp_path,
                                   precision="int8")
    quantized, parity = exporter._lower_graph("memory_attention", entry, tmp_path, config,
                                          _reference(modules, "memory_attention", example),
                                          to_numpy(example), [], {})
    assert quantized is None and parity["passed"] is False
    assert not (tmp_path / "memory_attention.int8.onnx").exists()
    assert "conditioned_features cosine" in exporter._drift(parity)
    # with the gate off (to measure what int8 costs in accuracy) the graph stays int8, and its
    # entry says why it was kept
    ungated = sam2.Sam2ExportConfig(ModelSource(image_size=256, random_init="micro"), tmp_path,
                                    precision="int8", precision_gate=False)
    assert ungated.command.endswith(f"--precision int8 --int8-method dynamic "
                                    f"--no-precision-gate --out {tmp_path}")
    kept, parity = exporter._lower_graph("memory_attention", entry, tmp_path, ungated,
                                     _reference(modules, "memory_attention", example),
                                     to_numpy(example), [], {})
    assert kept is not None and kept.precision == "int8" and parity["passed"] is False
    assert kept.exporter["precision_gate"].startswith("off: kept although")
    assert (tmp_path / "memory_attention.int8.onnx").exists()


def test_one_check_region_is_refused_before_export(tmp_path):
    """The region axis is dynamic: torch.export would fix it to an example's size of 1."""
    check = check_frames()
    one = CheckFrames(check.frames, check.boxes[:1], check.window)
    config = sam2.Sam2ExportConfig(ModelSource(image_size=256, random_init="micro"), tmp_path)
    with pytest.raises(InputError, match=r"1 check regions: expected 2\.\.16"):
        sam2.export_sam2(config, one)


def test_a_graph_without_matmul_gets_no_dynamic_int8(tmp_path):
    """Dynamic int8 quantizes MatMul/Gemm only: ConvInteger is slower than fp32 Conv on CPU."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 8, 8])
    w = onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w"], ["y"])], "conv",
                                   [x], [y], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "conv.onnx"))
    with pytest.raises(int8.NothingToQuantizeError, match="no MatMul/Gemm"):
        int8.quantize(tmp_path / "conv.onnx", tmp_path / "conv.int8.onnx")
    assert not (tmp_path / "conv.int8.onnx").exists()


def test_int8_quantization_leaves_the_hosts_logging_alone(tmp_path):
    """ONNX Runtime's quantizer warns on the root logger, whose first use installs a handler
    on sys.stderr as it is then: under a redirected stderr every later log line was lost."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 8])
    w = onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
                                   "matmul", [x], [y], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "matmul.onnx"))
    root = logging.getLogger()
    seen: list[logging.LogRecord] = []
    spy = logging.Handler(logging.DEBUG)
    spy.emit = seen.append
    saved, root.handlers = root.handlers, []  # pytest's capture handlers would hide the bug
    int8.log.addHandler(spy)
    int8.log.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            int8.quantize(tmp_path / "matmul.onnx", tmp_path / "matmul.int8.onnx")
        assert root.handlers == []
    finally:
        root.handlers = saved
        int8.log.removeHandler(spy)
        int8.log.setLevel(logging.NOTSET)
    assert any("pre-processing" in r.getMessage() for r in seen)
    assert (tmp_path / "matmul.int8.onnx").exists()


@pytest.mark.parametrize("graph", ["mask_decoder", "memory_attention"])
def test_fp16_graphs_keep_layernorm_softmax_fp32_and_verify(micro256, micro256_eager, tmp_path,
                                                            graph):
    _, modules, inputs = micro256_eager
    example = inputs.example[graph]
    entry = _copy_fp32(micro256[0], graph, tmp_path)
    config = sam2.Sam2ExportConfig(ModelSource(image_size=256, random_init="micro"), tmp_path,
                                   precision="fp16")
    lowered, parity = exporter._lower_graph(graph, entry, tmp_path, config,
                                        _reference(modules, graph, example), to_numpy(example),
                                        [], {})
    assert lowered is not None and lowered.precision == "fp16" and parity["passed"]
    assert lowered.exporter["kept_fp32"] == "LayerNormalization,Softmax"
    assert lowered.lint["tensorrt_ready"]
    assert min(o["cosine"] for o in parity["outputs"].values()) >= 0.9999
    if graph == "mask_decoder":
        assert parity["masks"]["iou"] >= 0.99


def test_config_rejects_unknown_choices(tmp_path):
    source = ModelSource(image_size=256, random_init="micro")
    with pytest.raises(InputError, match="precision"):
        sam2.Sam2ExportConfig(source, tmp_path, precision="int4")
    with pytest.raises(InputError, match="backends"):
        sam2.Sam2ExportConfig(source, tmp_path, backends=("aoti",))
    config = sam2.Sam2ExportConfig(source, tmp_path, precision="int8", int8_method="qdq",
                                   backends=("onnx", "aoti"))
    assert config.command == (f"rau-rt export sam2 --random-init micro --image-size 256 "
                              f"--precision int8 --int8-method qdq --backend aoti --out {tmp_path}")
    assert dataclasses.replace(config, precision="fp32").precision == "fp32"


def test_cli_names_the_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    code = cli.main(["export", "sam2", "--checkpoint", str(bad), "--config", "tiny",
                     "--image-size", "512", "--out", str(tmp_path / "out")])
    assert code == 1
    assert "does not load with torch.load" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_1024_exports_and_verifies(tmp_path):
    started = time.perf_counter()
    config = sam2.Sam2ExportConfig(ModelSource(image_size=1024, random_init="tiny"),
                                   tmp_path / "bundle")
    sam2.export_sam2(config, check_frames())
    elapsed = time.perf_counter() - started
    manifest = _manifest(tmp_path / "bundle")
    _check_fp32_entries(manifest["graphs"], 1024)
    print(f"tiny 1024 fp32 export: {elapsed:.1f} s")


@pytest.mark.slow
def test_micro_aoti_packages_verify(tmp_path):
    config = sam2.Sam2ExportConfig(ModelSource(image_size=256, random_init="micro"),
                                   tmp_path / "bundle", backends=("onnx", "aoti"))
    sam2.export_sam2(config, check_frames())
    entries = _manifest(tmp_path / "bundle")["graphs"]
    aoti = [e for e in entries if e["backend"] == "aotinductor"]
    assert {e["graph"] for e in aoti} == GRAPHS
    assert all(e["parity"]["passed"] for e in aoti)


def test_every_sam2_graphs_profile_is_consistent_and_runs(micro_bundle):
    from conftest import assert_profiles_are_consistent

    assert assert_profiles_are_consistent(micro_bundle.directory) >= 5  # every graph
