"""PyTorch backends: the eager reference engine and AOTInductor packages.

`TorchEagerEngine` runs a module in eager mode: the parity reference every export is checked
against (ARCHITECTURE.md rule 6). On CUDA with `EngineConfig.cuda_graph` it captures a CUDA
graph for a set of input shapes the second time it sees that set (a shape met once, such as
the tracker's growing memory over its first 16 frames, runs eagerly) and replays it after; up
to `MAX_CUDA_GRAPHS` are kept, the least recently used dropped first. The tracker's graphs see
a few shapes in steady state (one per region count), so a small model's kernel launches stop
costing more than its math.

`AotiEngine` runs a `.pt2` package compiled ahead of time by
`torch._inductor.aoti_compile_and_package`: a deployable engine on CPU and CUDA.

Both describe themselves: the exporter stores the input/output specs, precision and device in
the artifact (`torch.export.save` extra file, AOTInductor package metadata).

bfloat16 crosses the NumPy boundary as float32 because NumPy has no bfloat16: a bf16 engine
declares float32 specs, rounds feeds to bf16 on the way in and widens outputs on the way out.
That is the computation the artifact was built for, not a change of precision.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from rau_rt.config import DEFAULT_ENGINE_CONFIG, EngineConfig
from rau_rt.engines.base import Engine, check_precision, check_recorded, module_present
from rau_rt.errors import BackendUnavailableError, BundleError, EngineMismatchError
from rau_rt.types import TensorSpec

# Extra file (torch.export.save) / metadata key (AOTInductor) holding the artifact's description.
DESCRIPTION_KEY = "rau_rt.json"
# precision -> torch dtype name of the graph's floating-point tensors
TORCH_FLOAT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# precision -> NumPy dtype of floating-point tensors at the engine boundary
NUMPY_FLOAT = {"fp32": "float32", "fp16": "float16", "bf16": "float32"}
MAX_CUDA_GRAPHS = 16  # captured shape sets kept per engine
CUDA_GRAPH_WARMUP = 3  # eager runs on a side stream before a capture (torch's CUDA graph recipe)


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(
            f"torch does not import ({exc}); install the export extra: pip install "
            "'rau-rt[export]' (torch 2.14.1)") from exc
    return torch


def describe(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], precision: str,
             device: str) -> str:
    """The JSON description a torch artifact carries (written by the exporters)."""
    return json.dumps({"inputs": [s.to_dict() for s in inputs],
                       "outputs": [s.to_dict() for s in outputs],
                       "precision": precision, "device": device})


def _read_description(text: str, path: Path) -> tuple[tuple[TensorSpec, ...],
                                                      tuple[TensorSpec, ...], str, str]:
    if not text:
        raise BundleError(f"{path}: no {DESCRIPTION_KEY} description; export it with "
                          "rau_rt.export.graph (it records specs, precision and device)")
    data = json.loads(text)
    return (tuple(TensorSpec.from_dict(s) for s in data["inputs"]),
            tuple(TensorSpec.from_dict(s) for s in data["outputs"]),
            data["precision"], data["device"])


def _torch_device(torch, config: EngineConfig):
    if config.is_cuda and not torch.cuda.is_available():
        raise EngineMismatchError(f"device {config.device!r} asked for, but torch "
                                  f"{torch.__version__} sees no CUDA GPU; use device='cpu'")
    return torch.device(config.device)


class _TorchEngine(Engine):
    """Shared NumPy <-> torch plumbing of the two torch engines."""

    _graphable: ClassVar[bool] = False  # whether `EngineConfig.cuda_graph` captures its calls
    _autocast = None  # torch dtype of an autocast engine (fp32 weights, reduced-precision math)

    def __init__(self, call, inputs, outputs, precision: str, config: EngineConfig) -> None:
        super().__init__(inputs, outputs, precision, config)
        self._torch = _import_torch()
        self._call = call
        self._device = self._torch.device(config.device)
        self._float = getattr(self._torch, TORCH_FLOAT[precision]) if precision in TORCH_FLOAT \
            else None
        # shape set -> (graph, static inputs, static outputs), least recently used first
        self._graphs: dict[tuple, tuple] | None = (
            {} if config.cuda_graph and config.is_cuda and self._graphable else None)
        self._seen: set[tuple] = set()  # shape sets run once, eagerly

    @classmethod
    def available(cls) -> bool:
        return module_present("torch")

    def _to_torch(self, value: np.ndarray):
        tensor = self._torch.from_numpy(np.ascontiguousarray(value)).to(self._device)
        if self.precision == "bf16" and tensor.is_floating_point():
            tensor = tensor.to(self._float)
        return tensor

    def _to_numpy(self, tensor, spec: TensorSpec) -> np.ndarray:
        tensor = tensor.detach()
        if tensor.dtype == self._torch.bfloat16:
            tensor = tensor.float()
        value = tensor.cpu().numpy()
        if self._autocast is not None and value.dtype.kind == "f":
            value = value.astype(spec.dtype, copy=False)  # autocast leaves some outputs fp32
        return value

    def _context(self):
        if self._autocast is None:
            return contextlib.nullcontext()
        # no weight-cast cache: it would outlive a CUDA graph capture (torch's CUDA graph notes)
        return self._torch.autocast(self._device.type, dtype=self._autocast,
                                    cache_enabled=False)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [self._to_torch(feeds[spec.name]) for spec in self._inputs]
        with self._torch.inference_mode(), self._context():
            if self._graphs is not None:
                result = self._replay(args)
            else:
                result = self._outputs_of(self._call(*args))
            if self.config.is_cuda:
                self._torch.cuda.synchronize(self._device)
            return {spec.name: self._to_numpy(t, spec) for spec, t in zip(self._outputs, result,
                                                                           strict=True)}

    def _outputs_of(self, result) -> list:
        if isinstance(result, Mapping):
            return [result[spec.name] for spec in self._outputs]
        if not isinstance(result, list | tuple):
            return [result]
        return list(result)

    def _replay(self, args: list) -> list:
        """Run through the CUDA graph captured for these input shapes, capturing it first."""
        torch = self._torch
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        entry = self._graphs.pop(key, None)
        if entry is None and key not in self._seen:
            self._seen.add(key)  # bounded: a graph's inputs have bounded dynamic ranges
            return self._outputs_of(self._call(*args))
        if entry is None:
            static = [a.clone() for a in args]
            side = torch.cuda.Stream(self._device)
            side.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(side):
                for _ in range(CUDA_GRAPH_WARMUP):
                    self._call(*static)
            torch.cuda.current_stream(self._device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    outputs = self._outputs_of(self._call(*static))
            except RuntimeError as exc:
                raise EngineMismatchError(
                    f"CUDA graph capture failed for input shapes {[s for s, _ in key]} "
                    f"({exc}); run with cuda_graph=False") from exc
            entry = (graph, static, outputs)
            if len(self._graphs) >= MAX_CUDA_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))  # the least recently used
        self._graphs[key] = entry  # re-inserted: the most recently used
        graph, static, outputs = entry
        for buffer, value in zip(static, args, strict=True):
            buffer.copy_(value)
        graph.replay()
        return outputs

    def _release(self) -> None:
        self._call = None
        self._graphs = None


class TorchEagerEngine(_TorchEngine):
    """An `nn.Module` (or a saved `torch.export` program) run eagerly: the parity reference."""

    name: ClassVar[str] = "torch"
    # `.pt2` is also AOTInductor's suffix, so this engine is chosen only by name.
    suffixes: ClassVar[tuple[str, ...]] = ()
    _graphable: ClassVar[bool] = True

    @classmethod
    def from_module(cls, module, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                    config: EngineConfig = DEFAULT_ENGINE_CONFIG, *,
                    autocast: bool = False) -> TorchEagerEngine:
        """Wrap a module in eval mode on `config.device` at `config.precision` (default fp32).

        The module is cast to the requested precision because this engine is where a precision
        is chosen for the reference, not an artifact with one of its own. Float input specs must
        use that precision's boundary dtype (`NUMPY_FLOAT`). With `autocast` a reduced precision
        keeps the weights fp32 and runs every call under `torch.autocast` instead (matrix
        products and convolutions in fp16/bf16, reductions in fp32): for models whose code
        mixes dtypes on purpose, as sam2's does (`.float()` casts, fp32 positional encodings),
        and how sam2 itself runs in reduced precision.
        """
        torch = _import_torch()
        precision = config.precision or "fp32"
        if precision not in TORCH_FLOAT:
            raise EngineMismatchError(f"the eager torch engine runs fp32, fp16 or bf16, not "
                                      f"{precision}; int8 graphs run in onnxruntime or tensorrt")
        device = _torch_device(torch, config)
        mixed = autocast and precision != "fp32"
        weights = torch.float32 if mixed else getattr(torch, TORCH_FLOAT[precision])
        engine = cls(module.eval().to(device=device, dtype=weights), tuple(inputs),
                     tuple(outputs), precision, config)
        if mixed:
            engine._autocast = getattr(torch, TORCH_FLOAT[precision])
        return engine

    @classmethod
    def load(cls, path: str | Path, config: EngineConfig = DEFAULT_ENGINE_CONFIG, *,
             precision: str | None = None) -> TorchEagerEngine:
        """Load a `torch.export.save` archive written by `rau_rt.export.graph.save_exported`."""
        torch = _import_torch()
        path = Path(path)
        extra = {DESCRIPTION_KEY: ""}
        program = torch.export.load(str(path), extra_files=extra)
        inputs, outputs, built, device = _read_description(extra[DESCRIPTION_KEY], path)
        check_recorded(precision, built, path)
        check_precision(config, built, path)
        target = _torch_device(torch, config)
        module = program.module()
        if device != config.device:
            # An exported program's weights move with the module; its graph is device-neutral.
            module = module.to(target)
        return cls(module, inputs, outputs, built, config)


class AotiEngine(_TorchEngine):
    """A `.pt2` AOTInductor package: compiled kernels for the device it was built for."""

    name: ClassVar[str] = "aotinductor"
    suffixes: ClassVar[tuple[str, ...]] = (".pt2",)

    @classmethod
    def load(cls, path: str | Path, config: EngineConfig = DEFAULT_ENGINE_CONFIG, *,
             precision: str | None = None) -> AotiEngine:
        torch = _import_torch()
        path = Path(path)
        _torch_device(torch, config)
        if config.cuda_graph:
            raise EngineMismatchError(
                f"{path}: the AOTInductor engine does not capture CUDA graphs (compile the "
                "package with inductor's cudagraphs option instead); run with cuda_graph=False "
                "or the eager torch engine")
        runner = torch._inductor.aoti_load_package(str(path), device_index=(
            config.device_index if config.is_cuda else -1))
        inputs, outputs, built, device = _read_description(
            runner.get_metadata().get(DESCRIPTION_KEY, ""), path)
        if device.split(":")[0] != config.device.split(":")[0]:
            raise EngineMismatchError(
                f"{path}: AOTInductor package compiled for {device}, asked to run on "
                f"{config.device}; compiled kernels are device-specific: export it again "
                f"with device={config.device!r}")
        check_recorded(precision, built, path)
        check_precision(config, built, path)
        return cls(runner, inputs, outputs, built, config)
