"""int8 ONNX graphs with ONNX Runtime's quantizer: dynamic (CPU) or static QDQ (TensorRT).

`dynamic`: MatMul/Gemm weights int8 ahead of time, activations quantized per call
(DynamicQuantizeLinear + MatMulInteger). 1.2-1.6x faster on CPU with cosine >= 0.9996 on
SAM2-tiny (notes/feasibility.md, section 3), but TensorRT's parser rejects those ops: such a
graph runs in ONNX Runtime only, and its lint result says so. Conv stays fp32: ONNX Runtime's
ConvInteger made SAM2's memory encoder (mostly convolutions) 2.2x slower than fp32 at 1024 px
(benchmarks/bench_tracker.py), so a graph without MatMul gets no dynamic int8 graph at all.
`qdq`: QuantizeLinear/DequantizeLinear pairs around MatMul and Conv only, calibrated on frames,
symmetric int8. Quantizing every op drifted to cosine 0.85 in the same study; restricted to
MatMul/Conv it kept 0.9998. QDQ is the format TensorRT builds int8 engines from.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from rau_rt.engines.onnxruntime import PRECISION_METADATA_KEY
from rau_rt.errors import InputError

log = logging.getLogger(__name__)

METHODS = ("dynamic", "qdq")
QDQ_OPS = ("MatMul", "Conv")
DYNAMIC_OPS = ("MatMul", "Gemm")


class NothingToQuantizeError(InputError):
    """The graph has none of the ops the method quantizes (it stays fp32)."""


class _RootStandIn(logging.Handler):
    """The root logger's handler while ONNX Runtime quantizes (`_host_logging_untouched`):
    ONNX Runtime's own root-logger records go to this module's logger at DEBUG; any other
    record is handled as it would have been without this handler."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "root":
            log.debug("onnxruntime: %s", record.getMessage())
            return
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:  # a handler of the host's takes it: nothing to stand in for
            if any(h is not self for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        last = logging.lastResort
        if last is not None and record.levelno >= last.level:
            last.handle(record)


@contextlib.contextmanager
def _host_logging_untouched() -> Iterator[None]:
    """ONNX Runtime's quantizers warn through the root logger (`logging.warning`), and the
    first such call configures the host's logging (`logging.basicConfig`: a handler on
    sys.stderr as it is at that moment). Under a redirected stderr (the benchmarks hide the
    exporter's output) every later log line of the process went there, the tracker's
    warnings too. While ONNX Runtime runs, a stand-in handler keeps basicConfig out."""
    root = logging.getLogger()
    if root.handlers:  # configured already: basicConfig does nothing
        yield
        return
    stand_in = _RootStandIn()
    root.addHandler(stand_in)
    try:
        yield
    finally:
        root.removeHandler(stand_in)


class _Frames:
    """`CalibrationDataReader` over a list of feeds (duck-typed: ORT calls get_next/rewind)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self):
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return dict(self._feeds[self._next - 1])

    def rewind(self) -> None:
        self._next = 0


def quantize(source: str | Path, out: str | Path, method: str = "dynamic",
             calibration: Sequence[Mapping[str, np.ndarray]] = ()) -> Path:
    """Write an int8 copy of the fp32 ONNX graph `source` to `out`, tagged precision int8.

    Args:
        source: fp32 ONNX graph (weights inside the file).
        out: Where the int8 graph goes.
        method: "dynamic" or "qdq".
        calibration: Feeds the QDQ calibration runs (ignored by "dynamic").

    Raises:
        InputError: unknown method, or "qdq" without calibration feeds.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if method not in METHODS:
        raise InputError(f"int8 method {method!r}: expected one of {METHODS}")
    source, out = Path(source), Path(out)
    if method == "dynamic":
        graph = onnx.load(str(source), load_external_data=False).graph
        if not any(node.op_type in DYNAMIC_OPS for node in graph.node):
            raise NothingToQuantizeError(
                f"{source}: no {'/'.join(DYNAMIC_OPS)} to quantize dynamically (Conv stays fp32: "
                "ConvInteger is slower than fp32 Conv on CPU)")
        with _host_logging_untouched():
            quantize_dynamic(source, out, weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(DYNAMIC_OPS))
    else:
        if not calibration:
            raise InputError("qdq quantization needs calibration feeds (frames through the "
                             "graph); none were given")
        reader = type("FrameReader", (_Frames, CalibrationDataReader), {})(calibration)
        with _host_logging_untouched():
            quantize_static(source, out, reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QDQ_OPS), per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            extra_options={"ActivationSymmetric": True,
                                           "WeightSymmetric": True})
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, {PRECISION_METADATA_KEY: "int8",
                                        "rau_rt.int8_method": method})
    onnx.save(model, str(out))
    return out
