"""Backend selection (ARCHITECTURE.md rule 5), engine settings, and hosts without a backend."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from rau_rt import cli
from rau_rt.config import EngineConfig
from rau_rt.engines import registry
from rau_rt.errors import BackendUnavailableError, EngineMismatchError, InputError

onnx = pytest.importorskip("onnx", reason="graphs are built with onnx (pip install '.[export]')")


@pytest.fixture
def relu_onnx(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("name", "backend"), [("a.onnx", "onnxruntime"), ("a.engine", "tensorrt"),
                                               ("a.plan", "tensorrt"), ("a.pt2", "aotinductor"),
                                               ("A.ONNX", "onnxruntime")])
def test_suffix_table(name, backend):
    assert registry.backend_for_path(name) == backend


def test_unknown_suffix_lists_the_choices():
    with pytest.raises(InputError, match=r"'\.pth'.*\.onnx.*pass backend= one of"):
        registry.backend_for_path("model.pth")


def test_unknown_backend_lists_the_choices():
    with pytest.raises(InputError, match=r"'openvino' is not one of \['aotinductor', "
                       r"'onnxruntime', 'tensorrt', 'torch'\]"):
        registry.open_engine("model.onnx", "openvino")


def test_suffix_selects_onnxruntime(relu_onnx, caplog):
    caplog.set_level(logging.INFO)
    with registry.open_engine(relu_onnx) as engine:
        assert engine.name == "onnxruntime" and engine.precision == "fp32"
    assert "backend onnxruntime for" in caplog.text and "from its suffix" in caplog.text


def test_explicit_backend_beats_the_suffix(relu_onnx, tmp_path):
    renamed = tmp_path / "relu.pt2"
    renamed.write_bytes(relu_onnx.read_bytes())
    with registry.open_engine(renamed, "onnxruntime") as engine:
        assert engine.name == "onnxruntime"


def test_auto_falls_to_onnxruntime_cpu_and_says_why(relu_onnx, caplog):
    caplog.set_level(logging.INFO)
    with registry.open_engine(relu_onnx, "auto") as engine:
        assert engine.name == "onnxruntime" and engine.config.device == "cpu"
    assert "backend auto: onnxruntime on cpu" in caplog.text
    assert "tensorrt skipped" in caplog.text and "no CUDA provider" in caplog.text


def test_auto_never_downgrades_an_explicit_cuda_device(relu_onnx):
    with pytest.raises(BackendUnavailableError, match="no CUDAExecutionProvider"):
        registry.open_engine(relu_onnx, "auto", EngineConfig(device="cuda"))


def test_auto_on_an_engine_file_without_tensorrt(tmp_path):
    with pytest.raises(BackendUnavailableError, match="only tensorrt runs it"):
        registry.open_engine(tmp_path / "model.engine", "auto")


def test_onnxruntime_cuda_is_refused_without_the_provider(relu_onnx):
    with pytest.raises(BackendUnavailableError, match=r"lacks \['CUDAExecutionProvider'\].*"
                       "onnxruntime-gpu"):
        registry.open_engine(relu_onnx, "onnxruntime", EngineConfig(device="cuda"))


def test_precision_is_never_changed_silently(relu_onnx):
    with pytest.raises(EngineMismatchError, match=r"built in fp32 but EngineConfig\.precision "
                       r"is fp16"):
        registry.open_engine(relu_onnx, config=EngineConfig(precision="fp16"))


def test_tensorrt_without_tensorrt_says_how_to_install(tmp_path):
    if registry.backend_class("tensorrt").available():
        pytest.skip("tensorrt imports here; this checks hosts without it")
    with pytest.raises(BackendUnavailableError, match="does not import on this host"):
        registry.open_engine(tmp_path / "model.engine", config=EngineConfig(device="cuda"))


def test_tensorrt_engine_refuses_cpu(tmp_path):
    with pytest.raises(EngineMismatchError, match="TensorRT engines run on CUDA only"):
        registry.backend_class("tensorrt").load(tmp_path / "model.engine")


def test_onnxruntime_session_settings(relu_onnx, tmp_path):
    import numpy as np

    cache = tmp_path / "relu.opt.onnx"
    config = EngineConfig(intra_op_threads=1, inter_op_threads=1, graph_optimization="basic",
                          optimized_model_path=str(cache))
    x = np.array([[-1, 2, -3, 4], [5, -6, 7, -8]], np.float32)
    with registry.open_engine(relu_onnx, config=config) as first:
        y = first.run({"x": x})["y"]
    assert cache.exists() and json.loads(cache.with_name(cache.name + ".source.json").read_text())
    with registry.open_engine(relu_onnx, config=config) as second:  # loads the cached graph
        np.testing.assert_array_equal(second.run({"x": x})["y"], y)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_cpu_sessions_keep_add_and_layernorm_unfused(tmp_path):
    """ONNX Runtime's CPU SkipLayerNormalization ran 2.7-3.8x slower than the Add and
    LayerNormalization it replaces (engines/onnxruntime.py): a CPU session keeps them apart,
    with the same result."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    shape = [2, 16, 8]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "y", "z")]
    weights = [onnx.numpy_helper.from_array(np.full(8, 1.5, np.float32), "w"),
               onnx.numpy_helper.from_array(np.full(8, 0.25, np.float32), "b")]
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["s"]),
                               helper.make_node("LayerNormalization", ["s", "w", "b"], ["z"],
                                                axis=-1, epsilon=1e-5)],
                              "add_layernorm", info[:2], info[2:], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "add_ln.onnx"))
    cache = tmp_path / "add_ln.opt.onnx"
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    with registry.open_engine(tmp_path / "add_ln.onnx",
                              config=EngineConfig(optimized_model_path=str(cache))) as engine:
        z = engine.run({"x": x, "y": y})["z"]
    ops = {n.op_type for n in onnx.load(str(cache)).graph.node}
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
    stamp = json.loads(cache.with_name(cache.name + ".source.json").read_text())
    assert stamp["disabled_optimizers"] == ["SkipLayerNormFusion"]
    s = x + y
    expected = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(z, expected * 1.5 + 0.25, atol=1e-5)


@pytest.mark.parametrize(
    ("fields", "says"),
    [({"device": "gpu"}, "device: expected 'cpu', 'cuda' or 'cuda:N'"),
     ({"precision": "fp8"}, "precision: expected one of"),
     ({"providers": ("OpenVINOExecutionProvider",)}, "providers"),
     ({"intra_op_threads": -1}, "must be >= 0"),
     ({"graph_optimization": "max"}, "graph_optimization"),
     ({"cuda_graph": True}, "cuda_graph needs device='cuda'")],
)
def test_engine_config_rejects_bad_values(fields, says):
    with pytest.raises(InputError, match=says):
        EngineConfig(**fields)


def test_engine_config_is_frozen():
    config = EngineConfig(device="cuda:1")
    assert config.device_index == 1 and config.is_cuda
    with pytest.raises(AttributeError):
        config.device = "cpu"


def test_available_imports_nothing():
    code = ("import sys, json; from rau_rt.engines import registry; "
            "names = [n for n in registry.BACKENDS if registry.backend_class(n).available()]; "
            "print(json.dumps([names, sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'onnxruntime', 'tensorrt', 'cuda'))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, heavy = json.loads(out.stdout)
    assert "onnxruntime" in names
    assert heavy == []


def test_export_trt_without_tensorrt_fails_with_an_install_message(relu_onnx, capsys):
    if registry.backend_class("tensorrt").available():
        pytest.skip("tensorrt imports here; this checks hosts without it")
    from rau_rt.bundle import GraphEntry, Manifest, file_sha256, write_manifest
    from rau_rt.types import TensorSpec

    x, y = TensorSpec("x", (2, 4), "float32"), TensorSpec("y", (2, 4), "float32")
    entry = GraphEntry(graph="relu", file=relu_onnx.name, backend="onnxruntime",
                       precision="fp32", inputs=(x,), outputs=(y,), sha256=file_sha256(relu_onnx))
    write_manifest(relu_onnx.parent, Manifest("relu", (entry,)))
    assert cli.main(["export", "trt", "--bundle", str(relu_onnx.parent)]) == 1
    err = capsys.readouterr().err
    assert "rau-rt export: error: tensorrt does not import" in err
    assert "pip install 'tensorrt-cu12>=10,<11' cuda-python" in err


@pytest.mark.parametrize("spin_wait", [True, False])
def test_spin_wait_reaches_the_onnxruntime_session(relu_onnx, spin_wait):
    """Off: the session's intra- and inter-op threads do not spin after a run (on: ORT's
    default, no entry)."""
    engine = registry.open_engine(relu_onnx, "onnxruntime", EngineConfig(spin_wait=spin_wait))
    options = engine._session.get_session_options()
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        if spin_wait:
            with pytest.raises(RuntimeError, match="does not have configuration"):
                options.get_session_config_entry(key)
        else:
            assert options.get_session_config_entry(key) == "0"
    engine.close()


def test_without_prepacking_a_session_maps_its_weights_and_computes_the_same(tmp_path):
    """`prepack_weights=False` reaches the session, which then holds no repacked copy of an
    external-data MatMul weight (64 MiB) in anonymous memory, and its outputs agree with the
    prepacked session's."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4096, 4096), dtype=np.float32)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 4096])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 4096])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                                   [x], [y], [numpy_helper.from_array(weight, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "mm.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="mm.onnx.data")
    del model, graph, weight
    feeds = {"x": rng.standard_normal((8, 4096), dtype=np.float32)}

    def opened(prepack: bool):
        before = _rss_anon_mib()
        engine = registry.open_engine(path, "onnxruntime",
                                      EngineConfig(prepack_weights=prepack, intra_op_threads=1))
        return engine, _rss_anon_mib() - before

    packed, packed_mib = opened(True)
    mapped, mapped_mib = opened(False)
    options = mapped._session.get_session_options()
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    assert packed_mib > 48 and mapped_mib < 16, (packed_mib, mapped_mib)
    np.testing.assert_allclose(mapped.run(feeds)["y"], packed.run(feeds)["y"], rtol=1e-5,
                               atol=1e-4)
    packed.close()
    mapped.close()


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024
