"""Bundle manifest round trip and `load_bundle`'s validation errors, on a hand-built ONNX graph."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="graphs are built with onnx (pip install '.[export]')")

from rau_rt.bundle import (  # noqa: E402
    GraphEntry,
    Manifest,
    check_host,
    file_sha256,
    load_bundle,
    read_manifest,
    tool_versions,
    write_manifest,
)
from rau_rt.config import EngineConfig  # noqa: E402
from rau_rt.engines import registry  # noqa: E402
from rau_rt.errors import (  # noqa: E402
    BundleError,
    EngineMismatchError,
    InputError,
    ShapeError,
)
from rau_rt.types import TensorSpec  # noqa: E402

INPUT = TensorSpec("x", ("n", 4), "float32")
OUTPUT = TensorSpec("y", ("n", 4), "float32")
HOST = {"tensorrt": "10.7.0.23", "compute_capability": "8.9", "gpu": "NVIDIA L4"}


def write_relu(path):
    """y = relu(x) with a dynamic first dimension."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))


def entry_for(directory, file, backend="onnxruntime", **changes) -> GraphEntry:
    entry = GraphEntry(graph="relu", file=file, backend=backend, precision="fp32",
                       inputs=(INPUT,), outputs=(OUTPUT,), sha256=file_sha256(directory / file),
                       exporter={"name": "test", "command": "python make_relu.py"},
                       tools=tool_versions(), dynamic_ranges={"x": {"min": [1, 4], "opt": [2, 4],
                                                                    "max": [8, 4]}})
    return replace(entry, **changes)


@pytest.fixture
def relu_bundle(tmp_path):
    write_relu(tmp_path / "relu.onnx")
    write_manifest(tmp_path, Manifest("relu", (entry_for(tmp_path, "relu.onnx"),)))
    return tmp_path


def add_engine(directory, **tools):
    """A TensorRT entry whose file is present and checksummed (its bytes are not an engine)."""
    (directory / "relu.fp16.engine").write_bytes(b"not a real engine")
    manifest = read_manifest(directory)
    engine = entry_for(directory, "relu.fp16.engine", backend="tensorrt", precision="fp16",
                       device="cuda", tools=tool_versions(**{**HOST, **tools}))
    write_manifest(directory, replace(manifest, graphs=(*manifest.graphs, engine)))


def test_manifest_round_trips(relu_bundle):
    manifest = read_manifest(relu_bundle)
    assert manifest.graphs[0].inputs == (INPUT,)
    data = json.loads((relu_bundle / "manifest.json").read_text())
    entry = data["graphs"][0]
    for key in ("file", "backend", "precision", "inputs", "outputs", "sha256",
                "source_checkpoint_sha256", "exporter", "tools", "parity", "dynamic_ranges"):
        assert key in entry, key
    for tool in ("torch", "onnx", "onnxruntime", "tensorrt", "cuda", "compute_capability"):
        assert tool in entry["tools"], tool
    write_manifest(relu_bundle, manifest)
    assert read_manifest(relu_bundle) == manifest


def test_load_runs_and_checks_ranges(relu_bundle):
    with load_bundle(relu_bundle) as bundle:
        x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
        np.testing.assert_array_equal(bundle.run("relu", {"x": x})["y"], np.maximum(x, 0))
        with pytest.raises(ShapeError, match=r"outside the exported range \(1, 4\)..\(8, 4\)"):
            bundle.run("relu", {"x": np.zeros((9, 4), np.float32)})
        with pytest.raises(InputError, match="not loaded"):
            bundle.run("decoder", {"x": x})


def test_no_manifest(tmp_path):
    with pytest.raises(BundleError, match=r"manifest\.json: missing; a bundle is a directory"):
        load_bundle(tmp_path)


def test_missing_file_names_the_rebuild_command(relu_bundle):
    (relu_bundle / "relu.onnx").unlink()
    with pytest.raises(BundleError, match=r"relu.onnx: listed in manifest.json but missing; "
                       r"rebuild it: python make_relu.py"):
        load_bundle(relu_bundle)


def test_checksum_mismatch(relu_bundle):
    with (relu_bundle / "relu.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"sha256 .* does not match"):
        load_bundle(relu_bundle)


def test_side_files_are_checksummed(relu_bundle):
    from rau_rt.bundle import side_files

    (relu_bundle / "vlm.json").write_text('{"layout": 1}')
    (relu_bundle / "relu.onnx.data").write_bytes(b"weights")
    manifest = read_manifest(relu_bundle)
    files = side_files(relu_bundle, ["vlm.json"])
    assert set(files) == {"vlm.json", "relu.onnx.data"}  # external data found by itself
    write_manifest(relu_bundle, replace(manifest, files=files))
    assert read_manifest(relu_bundle).files == files
    load_bundle(relu_bundle).close()
    (relu_bundle / "vlm.json").write_text('{"layout": 2}')
    with pytest.raises(BundleError, match=r"vlm.json: sha256 does not match"):
        load_bundle(relu_bundle)
    (relu_bundle / "relu.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"relu.onnx.data: listed in manifest.json but missing"):
        load_bundle(relu_bundle)


def test_spec_mismatch_between_manifest_and_graph(relu_bundle):
    manifest = read_manifest(relu_bundle)
    wrong = replace(manifest.graphs[0], inputs=(TensorSpec("x", ("n", 5), "float32"),))
    write_manifest(relu_bundle, replace(manifest, graphs=(wrong,)))
    with pytest.raises(BundleError, match=r"x\('n', 4\):float32 -> .* do not match the "
                       r"manifest's x\('n', 5\)"):
        load_bundle(relu_bundle)


@pytest.mark.parametrize(
    ("tools", "says"),
    [({"tensorrt": "10.3.0.26"}, "TensorRT 10.3.0.26 for sm_89; this host has 10.7.0.23 / sm_89"),
     ({"compute_capability": "8.7"}, "for sm_87; this host has 10.7.0.23 / sm_89")],
    ids=["tensorrt-version", "gpu"],
)
def test_engine_for_another_host_says_how_to_rebuild(relu_bundle, tools, says):
    add_engine(relu_bundle, **tools)
    with pytest.raises(EngineMismatchError) as info:
        load_bundle(relu_bundle, backend="tensorrt", config=EngineConfig(device="cuda"),
                    host_info=lambda index: HOST)
    assert says in str(info.value)
    assert f"rau-rt export trt --bundle {relu_bundle} --precision fp16" in str(info.value)


def test_same_host_passes_the_host_check(relu_bundle):
    add_engine(relu_bundle, tensorrt="10.7.0.99")  # the build number does not matter
    entry = read_manifest(relu_bundle).entries("relu")[1]
    check_host(relu_bundle, entry, HOST)


def test_explicit_backend_without_an_entry(relu_bundle):
    with pytest.raises(BundleError, match=r"no tensorrt entry \(has \['onnxruntime'\]\); build "
                       "engines with: rau-rt export trt"):
        load_bundle(relu_bundle, backend="tensorrt", config=EngineConfig(device="cuda"))


def test_precision_request_selects_entries(relu_bundle):
    with pytest.raises(BundleError, match="no fp16 entry for graph 'relu'"):
        load_bundle(relu_bundle, config=EngineConfig(precision="fp16"))


def test_precision_the_exporter_rejected_says_why_and_the_way_out(tmp_path):
    # an int8 export keeps a graph fp32 when int8 misses its gate; asking for int8 then names
    # the gate's reason and how to run the exporter's choice instead
    write_relu(tmp_path / "relu.onnx")
    choice = "fp32: int8 (dynamic) rejected: masks IoU 0.9756 (>= 0.98)"
    write_manifest(tmp_path, Manifest("relu", (entry_for(
        tmp_path, "relu.onnx", exporter={"name": "test", "precision_choice": choice}),)))
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path, config=EngineConfig(precision="int8"))
    message = str(info.value)
    assert "no int8 entry for graph 'relu' (has ['fp32']" in message
    assert choice in message
    assert "leave the precision unset (--precision" in message


def test_auto_skips_an_engine_for_another_host(relu_bundle, monkeypatch, caplog):
    add_engine(relu_bundle, compute_capability="8.7")
    monkeypatch.setattr(registry.backend_class("tensorrt"), "available", classmethod(
        lambda cls: True))
    caplog.set_level(logging.INFO)
    with load_bundle(relu_bundle, backend="auto", host_info=lambda index: HOST) as bundle:
        assert bundle.entry("relu").backend == "onnxruntime"
        assert bundle.engines["relu"].config.device == "cpu"
    assert "built for another host" in caplog.text
    assert "rau-rt export trt --bundle" in caplog.text
    assert "backend auto: onnxruntime on cpu" in caplog.text


def test_auto_falls_back_when_probing_the_host_fails(relu_bundle, monkeypatch, caplog):
    add_engine(relu_bundle)
    monkeypatch.setattr(registry.backend_class("tensorrt"), "available", classmethod(
        lambda cls: True))

    def broken_driver(index):
        raise RuntimeError("cudaErrorInsufficientDriver")

    caplog.set_level(logging.INFO)
    with load_bundle(relu_bundle, backend="auto", host_info=broken_driver) as bundle:
        assert bundle.entry("relu").backend == "onnxruntime"
    assert "probing this host for TensorRT failed (RuntimeError: cudaErrorInsufficientDriver)" \
        in caplog.text
    assert "backend auto: onnxruntime on cpu" in caplog.text


def test_auto_without_tensorrt_takes_onnxruntime_cpu(relu_bundle, caplog):
    add_engine(relu_bundle)
    caplog.set_level(logging.INFO)
    with load_bundle(relu_bundle, backend="auto") as bundle:
        assert bundle.entry("relu").file == "relu.onnx"
    assert "tensorrt skipped: it does not import" in caplog.text


def test_format_version_is_checked(relu_bundle):
    path = relu_bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format_version 99"):
        read_manifest(relu_bundle)


def test_malformed_entry(relu_bundle):
    path = relu_bundle / "manifest.json"
    data = json.loads(path.read_text())
    del data["graphs"][0]["sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="malformed"):
        read_manifest(relu_bundle)


@pytest.mark.parametrize("edit, message", [
    (lambda text: "{not json", "not JSON"),
    (lambda text: "[1, 2]", "expected a JSON object"),
    (lambda text: text.replace('"graphs": [', '"graphs": [], "x": ['), "at least one graph"),
    (lambda text: text.replace('"graphs"', '"grafs"'), "at least one graph"),
])
def test_a_damaged_manifest_is_a_bundle_error(relu_bundle, edit, message):
    path = relu_bundle / "manifest.json"
    path.write_text(edit(path.read_text()))
    with pytest.raises(BundleError, match=message):
        load_bundle(relu_bundle)


@pytest.mark.parametrize("damage", [lambda data: b"garbage" * 10,
                                    lambda data: data[:len(data) // 2]])
def test_a_damaged_graph_whose_checksum_was_updated_is_a_bundle_error(relu_bundle, damage):
    graph = relu_bundle / "relu.onnx"
    graph.write_bytes(damage(graph.read_bytes()))
    path = relu_bundle / "manifest.json"
    data = json.loads(path.read_text())
    for entry in data["graphs"]:
        entry["sha256"] = file_sha256(graph)
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="ONNX Runtime cannot load this graph"):
        load_bundle(relu_bundle)
