"""Graph weights written and read one tensor at a time (ONNX initializers, inline or external).

The VLM export never holds a graph's weights as one serialized message: `graphs.write_onnx`
writes the traced graph's weights from the torch module tensor by tensor, and
`quantize.quantize` reads an fp32 graph's weights the same way while it writes the quantized
graph. Over `EXTERNAL_DATA_BYTES` the weights go to `<graph file>.data` beside the graph (ONNX
external data), each tensor on a page boundary so that ONNX Runtime can map it from the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# Weights above this many bytes go to `<graph file>.data`; smaller graphs keep them inline.
EXTERNAL_DATA_BYTES = 256 << 20
_ALIGN = 4096
# Rows of a weight converted and written at a time by `WeightWriter.from_torch`.
_BLOCK_BYTES = 64 << 20


def data_file(graph: Path) -> Path:
    """Where `graph`'s external weights are."""
    return graph.with_name(graph.name + ".data")


class WeightWriter:
    """Appends initializers to a graph, their bytes inline or in `<graph>.data`.

    Use as a context manager; `external` is decided up front from the weights' total size.
    """

    def __init__(self, graph_path: Path, total_bytes: int) -> None:
        self.path = data_file(graph_path)
        self.external = total_bytes > EXTERNAL_DATA_BYTES
        self.path.unlink(missing_ok=True)
        self._file = None

    def __enter__(self) -> WeightWriter:
        if self.external:
            self._file = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """An initializer named `name` holding `array` (written out now when external)."""
        array = np.ascontiguousarray(array)
        if not self.external:
            return numpy_helper.from_array(array, name)
        proto = self._open(name, array.shape, array.dtype)
        array.tofile(self._file)
        return self._close(proto)

    def rows(self, name: str, array, convert) -> onnx.TensorProto:
        """An initializer named `name` holding `convert(array)`, where `array` is anything
        sliced by rows (a torch view, a numpy memmap) and `convert` maps a block of its rows to
        a numpy array; when external, converted and written a block of rows at a time, so that
        no whole converted copy of it is ever made."""
        if not self.external or len(array.shape) < 2:
            return self.tensor(name, convert(array[...]))
        row = convert(array[:1])
        proto = self._open(name, tuple(array.shape), row.dtype)
        rows = max(1, _BLOCK_BYTES // row.nbytes)
        for start in range(0, array.shape[0], rows):
            np.ascontiguousarray(convert(array[start:start + rows])).tofile(self._file)
        return self._close(proto)

    def from_torch(self, name: str, tensor) -> onnx.TensorProto:
        """An initializer named `name` holding a torch tensor of any layout (a transposed
        view, say), floating ones upcast to fp32, written by `rows`."""
        return self.rows(name, tensor, _numpy)

    def _open(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> onnx.TensorProto:
        """An external initializer's header, its data starting at the next page boundary."""
        self._file.seek(-self._file.tell() % _ALIGN, 1)
        self._start = self._file.tell()
        return onnx.TensorProto(name=name, dims=shape,
                                data_type=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    def _close(self, proto: onnx.TensorProto) -> onnx.TensorProto:
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self._start)),
                           ("length", str(self._file.tell() - self._start))):
            proto.external_data.add(key=key, value=value)
        return proto


def _numpy(tensor) -> np.ndarray:
    """A torch tensor as a contiguous numpy array, floating dtypes as fp32."""
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.contiguous().numpy()


def nbytes(tensor: onnx.TensorProto) -> int:
    """An initializer's size in bytes, without reading external data."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in tensor.external_data}["length"])
    return numpy_helper.to_array(tensor).nbytes if not tensor.raw_data else len(tensor.raw_data)


def mapped(tensor: onnx.TensorProto, directory: Path) -> np.ndarray:
    """An initializer's values, external data mapped from its file (read as it is sliced)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    return np.memmap(directory / info["location"], mode="r",
                     dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type),
                     offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))


def read(tensor: onnx.TensorProto, directory: Path) -> np.ndarray:
    """An initializer's values in memory; external data is read from its file, this tensor
    only."""
    return np.array(mapped(tensor, directory))
