"""Frozen configuration dataclasses; each field maps one-to-one onto a CLI flag (STYLE.md 7)."""

from __future__ import annotations

from dataclasses import dataclass

from rau_rt.errors import InputError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# ONNX Runtime's GraphOptimizationLevel members, by the name users type.
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
# ONNX Runtime execution providers rau-rt knows how to configure.
ORT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class EngineConfig:
    """Backend-independent engine settings (`rau-rt run --device ... --precision ...`).

    Attributes:
        device: "cpu" or "cuda" / "cuda:N". An engine that cannot run there raises; none falls
            back to another device.
        precision: The precision the caller expects, or None to take the artifact's. A mismatch
            with the artifact raises `EngineMismatchError`; the eager torch engine casts its
            module to it (that engine builds its graph from the module, so this is a request,
            not a silent change).
        providers: ONNX Runtime execution providers in priority order; empty means the device's
            default (cpu: CPU; cuda: CUDA then CPU for the ops CUDA lacks).
        intra_op_threads: Threads inside one op; 0 lets the runtime choose (physical cores).
        inter_op_threads: Threads across independent ops; 0 lets the runtime choose.
        graph_optimization: ONNX Runtime graph optimization level: disable|basic|extended|all.
        optimized_model_path: Where ONNX Runtime writes the optimized graph, so that a second
            start can load it (and a human can inspect it); None writes nothing.
        cuda_graph: Capture the engine's launch in a CUDA graph and replay it (static shapes on
            CUDA only; TensorRT and the ONNX Runtime CUDA provider).
        io_binding: Bind ONNX Runtime inputs/outputs to preallocated buffers on CUDA.
        spin_wait: Let ONNX Runtime's intra-op threads spin after a run (its default): faster
            back-to-back runs, but the spinning threads take the cores from whatever runs next
            (NumPy between graphs, another engine, torch); off for pipelines on few cores.
        prepack_weights: Let ONNX Runtime's CPU kernels repack MatMul weights into their own
            layout when the session opens (its default; faster runs). The repacked copy is
            anonymous memory, made while the weights are also mapped from the file, so opening
            a session costs about the weights once more at its peak. Off: the weights stay
            mapped from the file (clean pages the kernel can reclaim) and are packed per call:
            slower runs, no load-time copy. The VLM exporter's fp32 checks turn it off.
    """

    device: str = "cpu"
    precision: str | None = None
    providers: tuple[str, ...] = ()
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    optimized_model_path: str | None = None
    cuda_graph: bool = False
    io_binding: bool = True
    spin_wait: bool = True
    prepack_weights: bool = True

    def __post_init__(self) -> None:
        if self.device != "cpu" and self.device != "cuda" and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise InputError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"precision: expected one of {PRECISIONS} or None, "
                             f"got {self.precision!r}")
        object.__setattr__(self, "providers", tuple(self.providers))
        unknown = [p for p in self.providers if p not in ORT_PROVIDERS]
        if unknown:
            raise InputError(f"providers: {unknown} not in {ORT_PROVIDERS}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise InputError("intra_op_threads and inter_op_threads must be >= 0 (0: default)")
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise InputError(f"graph_optimization: expected one of {GRAPH_OPTIMIZATION_LEVELS}, "
                             f"got {self.graph_optimization!r}")
        if self.cuda_graph and self.device == "cpu":
            raise InputError("cuda_graph needs device='cuda'; CUDA graphs do not exist on CPU")

    @property
    def device_index(self) -> int:
        """The CUDA device ordinal (0 for "cuda"); 0 on CPU."""
        return int(self.device[5:]) if self.device.startswith("cuda:") else 0

    @property
    def is_cuda(self) -> bool:
        """Whether the engine runs on a CUDA device."""
        return self.device.startswith("cuda")


# The default engine settings, shared so that signatures need no call in their defaults.
DEFAULT_ENGINE_CONFIG = EngineConfig()
