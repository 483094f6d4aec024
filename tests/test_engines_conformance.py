"""One conformance suite over every registered engine (STYLE.md, Tests).

A tiny conv + MLP model is built in code, exported by `rau_rt.export.graph.export_graph` into a
bundle under a temporary directory once per module (AOTInductor's compile takes ~30 s on 2
cores), and every backend is loaded through `load_bundle`, the path users take.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the conformance models are built with torch "
                            "(pip install '.[export]')")

from rau_rt.bundle import Manifest, load_bundle, read_manifest, write_manifest  # noqa: E402
from rau_rt.config import EngineConfig  # noqa: E402
from rau_rt.engines import registry  # noqa: E402
from rau_rt.engines.base import EngineClosedError, module_present  # noqa: E402
from rau_rt.errors import BundleError, EngineMismatchError, ShapeError  # noqa: E402
from rau_rt.export.graph import DynamicDim, export_graph  # noqa: E402
from rau_rt.export.verify import TOLERANCES, compare  # noqa: E402
from rau_rt.types import TensorSpec  # noqa: E402

TENSORRT_SKIP = pytest.mark.skipif(
    not module_present("tensorrt"),
    reason="tensorrt does not import on this host (its PyPI wheels download from NVIDIA's "
    "index); the TensorRT engine runs only where TensorRT 10 is installed")
BACKENDS = [
    pytest.param("onnxruntime", id="onnxruntime-cpu"),
    pytest.param("torch", id="torch-eager"),
    pytest.param("aotinductor", id="aotinductor-cpu"),
    pytest.param("tensorrt", id="tensorrt", marks=[pytest.mark.gpu, TENSORRT_SKIP]),
]
GRAPH = "tiny"
BATCH = DynamicDim("batch", 1, 4)
INPUTS = (TensorSpec("image", ("batch", 3, 16, 16), "float32"),)
OUTPUTS = (TensorSpec("logits", ("batch", 10), "float32"),
           TensorSpec("features", ("batch", 16), "float32"))


class TinyConvMlp(torch.nn.Module):
    """Conv -> ReLU -> global mean -> MLP with GELU: conv, matmul, reduction, activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, 10))

    def forward(self, image):
        features = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return self.mlp(features), features


@pytest.fixture(scope="module")
def model() -> TinyConvMlp:
    torch.manual_seed(0)
    return TinyConvMlp().eval()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, model):
    """A bundle with the model exported for every backend that can be exported here."""
    directory = tmp_path_factory.mktemp("bundle")
    example = {"image": torch.randn(2, 3, 16, 16)}
    entries = [export_graph(model, example, directory, GRAPH, backend,
                            output_names=[s.name for s in OUTPUTS],
                            dynamic={"image": {0: BATCH}})
               for backend in ("onnxruntime", "torch", "aotinductor")]
    write_manifest(directory, Manifest("tiny", tuple(entries)))
    if module_present("tensorrt"):
        from rau_rt.export.command import build_bundle

        build_bundle(directory, "fp16")
    return directory


def _config(backend: str) -> EngineConfig:
    return EngineConfig(device="cuda") if backend == "tensorrt" else EngineConfig()


def _symbolic(specs):
    """Specs with every dynamic dim as None: TensorRT reports -1, not the export's names."""
    return tuple(TensorSpec(s.name, tuple(d if isinstance(d, int) else None for d in s.shape),
                            s.dtype) for s in specs)


def test_every_registered_backend_is_covered():
    assert {p.values[0] for p in BACKENDS} == set(registry.BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_specs_match_the_manifest(bundle_dir, backend):
    with load_bundle(bundle_dir, backend=backend, config=_config(backend)) as bundle:
        entry, engine = bundle.entry(GRAPH), bundle.engines[GRAPH]
        assert entry.backend == backend
        assert engine.inputs == entry.inputs and engine.outputs == entry.outputs
        if backend != "tensorrt":  # fp16 engines keep fp32 I/O; names of dims are ONNX's
            assert engine.inputs == INPUTS and engine.outputs == OUTPUTS
        assert _symbolic(engine.inputs) == _symbolic(INPUTS)
        assert engine.precision == entry.precision


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_match_torch_eager(bundle_dir, model, backend, batch):
    image = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        logits, features = model(torch.from_numpy(image))
    reference = {"logits": logits.numpy(), "features": features.numpy()}
    with load_bundle(bundle_dir, backend=backend, config=_config(backend)) as bundle:
        outputs = bundle.run(GRAPH, {"image": image})
        precision = bundle.entry(GRAPH).precision
    assert {k: v.shape for k, v in outputs.items()} == {"logits": (batch, 10),
                                                        "features": (batch, 16)}
    assert all(v.dtype == np.float32 for v in outputs.values())
    result = compare(reference, outputs, precision)
    assert result["passed"], (TOLERANCES[precision], result)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("feeds", "says"),
    [
        ({"image": np.zeros((1, 4, 16, 16), np.float32)}, "expected shape"),  # channels
        ({"image": np.zeros((1, 3, 16), np.float32)}, "expected shape"),  # rank
        ({"image": np.zeros((1, 3, 16, 16), np.float64)}, "expected dtype float32"),
        ({}, "missing ['image']"),
        ({"image": np.zeros((1, 3, 16, 16), np.float32),
          "mask": np.zeros((1,), np.float32)}, "unexpected ['mask']"),
        ({"image": [[0.0]]}, "numpy.ndarray"),
    ],
    ids=["channels", "rank", "dtype", "missing", "extra", "not-an-array"],
)
def test_wrong_feeds_raise_shape_error(bundle_dir, backend, feeds, says):
    with load_bundle(bundle_dir, backend=backend, config=_config(backend)) as bundle:
        with pytest.raises(ShapeError, match=r"image|mask|feeds") as info:
            bundle.engines[GRAPH].run(feeds)
    assert says in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_outside_the_exported_range_raises_shape_error(bundle_dir, backend):
    with load_bundle(bundle_dir, backend=backend, config=_config(backend)) as bundle:
        with pytest.raises(ShapeError, match=r"outside the exported range \(1, 3, 16, 16\)"):
            bundle.run(GRAPH, {"image": np.zeros((5, 3, 16, 16), np.float32)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_is_idempotent(bundle_dir, backend):
    bundle = load_bundle(bundle_dir, backend=backend, config=_config(backend))
    engine = bundle.engines[GRAPH]
    with engine:
        assert not engine.closed
    assert engine.closed
    engine.close()
    bundle.close()
    with pytest.raises(EngineClosedError, match="closed"):
        engine.run({"image": np.zeros((1, 3, 16, 16), np.float32)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_tampered_file_fails_the_checksum(bundle_dir, backend, tmp_path):
    tampered = tmp_path / "bundle"
    shutil.copytree(bundle_dir, tampered)
    entry = next(e for e in read_manifest(tampered).graphs if e.backend == backend)
    target = tampered / entry.file
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{entry.file}: sha256 .* does not match"):
        load_bundle(tampered, backend=backend, config=_config(backend))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_eager_engine_runs_the_requested_precision(model, precision):
    config = EngineConfig(precision=precision)
    boundary = "float16" if precision == "fp16" else "float32"  # NumPy has no bfloat16
    inputs = (TensorSpec("image", ("batch", 3, 16, 16), boundary),)
    outputs = tuple(TensorSpec(s.name, s.shape, boundary) for s in OUTPUTS)
    engine = registry.backend_class("torch").from_module(copy.deepcopy(model), inputs, outputs,
                                                         config)
    image = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        logits, features = model(torch.from_numpy(image))
    with engine:
        assert engine.precision == precision
        got = engine.run({"image": image.astype(boundary)})
    assert got["logits"].dtype == np.dtype(boundary)
    result = compare({"logits": logits.numpy(), "features": features.numpy()}, got, precision)
    assert result["passed"], result
    # The fixture's module stays fp32: from_module casts only the module it is given.
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.gpu
def test_eager_engine_cuda_graphs_replay_each_shape_with_new_inputs(model):
    """CUDA twin of the eager engine's outputs test: captured graphs (a shape's second call
    captures, later ones replay) answer like eager runs, for new values (the replay reads the
    copied inputs) and for each batch size."""
    from rau_rt.engines.torch import TorchEagerEngine

    eager = TorchEagerEngine.from_module(copy.deepcopy(model), INPUTS, OUTPUTS,
                                         EngineConfig(device="cuda"))
    graphed = TorchEagerEngine.from_module(copy.deepcopy(model), INPUTS, OUTPUTS,
                                           EngineConfig(device="cuda", cuda_graph=True))
    rng = np.random.default_rng(7)
    for batch in (1, 3, 1, 3, 1, 3):
        image = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        want, got = eager.run({"image": image}), graphed.run({"image": image})
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert len(graphed._graphs) == 2  # one capture per batch size, replayed after
    eager.close()
    graphed.close()


def test_fp16_onnx_graph_matches_within_fp16_tolerance(model, tmp_path):
    entry = export_graph(model, {"image": torch.randn(2, 3, 16, 16)}, tmp_path, GRAPH,
                         "onnxruntime", output_names=["logits", "features"], precision="fp16")
    assert entry.inputs[0].dtype == "float16" and entry.parity["passed"]
    assert entry.lint["tensorrt_ready"] is True
    with registry.open_engine(tmp_path / entry.file) as engine:
        assert engine.precision == "fp16"  # read from the graph's metadata, not guessed


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "aotinductor"])
def test_manifest_precision_must_match_the_artifact(bundle_dir, backend, tmp_path):
    copied = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copied)
    manifest = read_manifest(copied)
    graphs = tuple(replace(e, precision="fp16") if e.backend == backend else e
                   for e in manifest.graphs)
    write_manifest(copied, replace(manifest, graphs=graphs))
    with pytest.raises(EngineMismatchError, match="the manifest records fp16 but the file was "
                       "built in fp32"):
        load_bundle(copied, backend=backend)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_aotinductor_package_in_reduced_precision(model, precision, tmp_path):
    entry = export_graph(model, {"image": torch.randn(2, 3, 16, 16)}, tmp_path, GRAPH,
                         "aotinductor", output_names=["logits", "features"],
                         precision=precision)
    assert entry.parity["passed"], entry.parity  # checked inside export against eager fp32
    boundary = "float16" if precision == "fp16" else "float32"  # NumPy has no bfloat16
    with registry.open_engine(tmp_path / entry.file) as engine:
        assert engine.precision == precision
        assert [s.dtype for s in engine.inputs + engine.outputs] == [boundary] * 3
        with pytest.raises(EngineMismatchError, match=f"built in {precision}"):
            registry.open_engine(tmp_path / entry.file, config=EngineConfig(precision="fp32"))
