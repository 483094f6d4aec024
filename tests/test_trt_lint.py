"""`rau_rt.export.trt_build.lint` (TensorRT 10 readiness) and the fp16 graph conversion, no GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="graphs are built with onnx (pip install '.[export]')")

from rau_rt import cli  # noqa: E402
from rau_rt.engines import registry  # noqa: E402
from rau_rt.errors import InputError  # noqa: E402
from rau_rt.export import trt_build  # noqa: E402

H = onnx.helper
T = onnx.TensorProto


def save(tmp_path, name, nodes, inputs, outputs, opset=18, initializers=(), domains=()):
    graph = H.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    opsets = [H.make_opsetid("", opset)] + [H.make_opsetid(d, 1) for d in domains]
    model = H.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def value(name, elem=T.FLOAT, shape=(2, 8)):
    return H.make_tensor_value_info(name, elem, list(shape))


def messages(report, severity):
    return [(i.op, i.message) for i in report.issues if i.severity == severity]


def layernorm_graph(tmp_path):
    scale = onnx.numpy_helper.from_array(np.ones(8, np.float32), "scale")
    bias = onnx.numpy_helper.from_array(np.zeros(8, np.float32), "bias")
    w = onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    nodes = [H.make_node("MatMul", ["x", "w"], ["h"]),
             H.make_node("LayerNormalization", ["h", "scale", "bias"], ["n"], axis=-1),
             H.make_node("Softmax", ["n"], ["y"], axis=-1)]
    return save(tmp_path, "block", nodes, [value("x")], [value("y")],
                initializers=[scale, bias, w])


def test_a_clean_graph_is_ready(tmp_path):
    report = trt_build.lint(layernorm_graph(tmp_path))
    assert report.ok and report.issues == ()
    assert report.opset == 18 and report.op_counts == {"MatMul": 1, "LayerNormalization": 1,
                                                       "Softmax": 1}
    assert "TensorRT 10 ready" in report.format()


def test_unsupported_op_is_an_error(tmp_path):
    nodes = [H.make_node("Unique", ["x"], ["y"], sorted=1)]
    path = save(tmp_path, "unique", nodes, [value("x", shape=(8,))], [value("y", shape=("n",))])
    report = trt_build.lint(path)
    assert not report.ok
    assert messages(report, "error") == [("Unique", "not supported by TensorRT 10's ONNX parser")]
    with pytest.raises(InputError, match="not buildable with TensorRT 10"):
        trt_build.require_ready(report)


def test_complex_tensors_are_an_error(tmp_path):
    nodes = [H.make_node("Identity", ["x"], ["y"])]
    path = save(tmp_path, "rope", nodes, [value("x", T.COMPLEX64)], [value("y", T.COMPLEX64)])
    report = trt_build.lint(path)
    assert not report.ok
    errors = messages(report, "error")
    assert ("tensor", "complex64 tensor; TensorRT has no such type (rewrite it real-valued, e.g. "
            "SAM2's RoPE)") in errors
    assert {i.node for i in report.issues if i.severity == "error"} >= {"x", "y"}


def test_int64_into_a_float_only_op_is_noted(tmp_path):
    nodes = [H.make_node("Clip", ["x"], ["y"])]
    path = save(tmp_path, "clip", nodes, [value("x", T.INT64)], [value("y", T.INT64)])
    report = trt_build.lint(path)
    assert report.ok
    assert any("INT64 but TensorRT lists Clip for float types only" in m
               for _, m in messages(report, "note"))


def test_custom_domain_needs_a_plugin(tmp_path):
    nodes = [H.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")]
    path = save(tmp_path, "fused", nodes, [value("x", shape=(8, 8))], [value("y", shape=(8, 8))],
                domains=["com.microsoft"])
    assert "plugin" in messages(trt_build.lint(path), "error")[0][1]


def test_decomposed_layernorm_below_opset_17_is_a_warning(tmp_path):
    nodes = [H.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
             H.make_node("Sub", ["x", "m"], ["d"]),
             H.make_node("Pow", ["d", "two"], ["y"])]
    two = onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")
    path = save(tmp_path, "ln16", nodes, [value("x")], [value("y")], opset=16,
                initializers=[two])
    report = trt_build.lint(path)
    assert report.ok
    assert any("re-export with opset >= 17" in m for _, m in messages(report, "warning"))


def test_nonzero_zero_point_is_an_error(tmp_path):
    scale = onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = onnx.numpy_helper.from_array(np.array(3, np.int8), "z")
    nodes = [H.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             H.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    path = save(tmp_path, "qdq", nodes, [value("x")], [value("y")], initializers=[scale, zero])
    report = trt_build.lint(path)
    assert [op for op, m in messages(report, "error") if "zero point" in m] == [
        "QuantizeLinear", "DequantizeLinear"]
    assert trt_build.has_qdq(path)


def test_opset_outside_the_parser_range(tmp_path):
    path = save(tmp_path, "old", [H.make_node("Relu", ["x"], ["y"])], [value("x")],
                [value("y")], opset=8)
    assert "outside TensorRT 10's 9..24" in messages(trt_build.lint(path), "error")[0][1]


def test_cli_lint_reports_per_graph(tmp_path, capsys):
    good = layernorm_graph(tmp_path)
    bad = save(tmp_path, "unique", [H.make_node("Unique", ["x"], ["y"])],
               [value("x", shape=(8,))], [value("y", shape=("n",))])
    assert cli.main(["export", "lint", str(good), str(bad), "--json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert reports[str(good)]["tensorrt_ready"] is True
    assert reports[str(bad)]["tensorrt_ready"] is False and reports[str(bad)]["errors"] == 1
    assert cli.main(["export", "lint", str(good)]) == 0
    assert "block.onnx: TensorRT 10 ready" in capsys.readouterr().out


def test_fp16_conversion_keeps_layernorm_and_softmax_fp32(tmp_path):
    source = layernorm_graph(tmp_path)
    out = trt_build.convert_fp16(source, tmp_path / "block.fp16.onnx")
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == T.FLOAT  # I/O stays fp32
    matmul_weight = next(i for i in model.graph.initializer if i.name == "w")
    assert matmul_weight.data_type == T.FLOAT16
    kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
    assert all(types[n.output[0]] == T.FLOAT for n in kept)
    assert trt_build.lint(out).ok
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    with registry.open_engine(source) as fp32, registry.open_engine(out) as fp16:
        assert fp16.precision == "fp16" and fp16.inputs == fp32.inputs
        np.testing.assert_allclose(fp16.run({"x": x})["y"], fp32.run({"x": x})["y"], atol=2e-3)


def test_fp16_conversion_of_a_graph_over_protobufs_limit_writes_external_data(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(trt_build, "PROTOBUF_LIMIT", 0)  # as for a 3B decoder's 6 GB
    source = layernorm_graph(tmp_path)
    out = trt_build.convert_fp16(source, tmp_path / "block.fp16.onnx")
    model = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == T.EXTERNAL for t in model.graph.initializer)
    assert (tmp_path / "block.fp16.onnx.data").stat().st_size > 0
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    with registry.open_engine(source) as fp32, registry.open_engine(out) as fp16:
        np.testing.assert_allclose(fp16.run({"x": x})["y"], fp32.run({"x": x})["y"], atol=2e-3)


def test_an_fp16_build_converts_any_graph_that_holds_fp32(tmp_path):
    """`vlm_embed` takes int64 token ids and holds an fp32 table: the first input's type said
    nothing about it, so it was built fp32 and recorded fp16."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rau_rt.export.trt_build import convert_fp16, holds_fp32

    table = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(6, 2), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embeds"])], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, [3, 2])], [table])
    path = tmp_path / "embed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert holds_fp32(path)
    half = convert_fp16(path, tmp_path / "embed.fp16.onnx", keep_io_types=False)
    assert not holds_fp32(half)
