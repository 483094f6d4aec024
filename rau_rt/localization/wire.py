"""The central localizer's wire format (KServe v2 tensors), shared by server and client.

Every request is two tensors: `request`, one BYTES element holding a JSON header, and `data`,
the raw UINT8 bytes of the arrays the header describes (an image, then the masks of a
reference's regions, bit-packed). The answer is one BYTES element `response` holding JSON.
Raw bytes with a header keep one model signature for uint8 and uint16, gray and colour, and
let the server check sizes before it trusts anything (a wrong dtype, shape or a truncated
buffer is an `InputError` naming the field, not a crash in numpy).

One model serves it (`MODEL`); the header's "op" says what a request asks: "register" (a
reference in, its id out) or "locate" (a reference id and a frame in, boxes out). One model,
not two, because Triton runs each Python-backend model in its own process and the registered
references must live where the queries run. A reference's id is the SHA-256 of its
encoding, so the same annotated reference gets the same id on every server and after a
restart, and towers sharing a reference share its cached prefix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np

from rau_rt.errors import InputError
from rau_rt.localization import prompts
from rau_rt.localization.localizer import LocateResult
from rau_rt.reference import Reference
from rau_rt.types import Frame, Region, check_frame_size

PROTOCOL = 1
MODEL = "rau_localizer"
OPS = ("register", "locate")
_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}


def _header(fields: Mapping[str, object]) -> np.ndarray:
    return np.array([json.dumps({"protocol": PROTOCOL, **fields}).encode()], dtype=object)


def _image_header(image: np.ndarray) -> dict[str, object]:
    return {"shape": list(image.shape), "dtype": str(image.dtype)}


def encode_reference(reference: Reference,
                     annotated: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(request, data)` registering `reference`: the image, its annotated rendering
    (`prompts.annotated_image`, drawn here: OpenCV 4 and 5 draw text differently, and the
    server must show the VLM what a local localizer would), its regions (box, polygon,
    mask)."""
    image = np.ascontiguousarray(reference.image)
    if annotated is None:
        annotated = prompts.annotated_image(reference)
    annotated = np.ascontiguousarray(annotated)
    regions = []
    chunks = [image.reshape(-1).view(np.uint8), annotated.reshape(-1)]
    for region in reference.regions:
        item: dict[str, object] = {"name": region.name}
        if region.box is not None:
            item["box"] = [int(v) for v in region.box]
        if region.polygon is not None:
            item["polygon"] = [[float(x), float(y)] for x, y in region.polygon]
        if region.mask is not None:
            item["mask"] = True
            chunks.append(np.packbits(np.asarray(region.mask, bool).reshape(-1)))
        regions.append(item)
    header = _header({"op": "register", "image": _image_header(image),
                      "annotated": _image_header(annotated),
                      "channel_order": reference.channel_order,
                      "name": reference.name, "regions": regions})
    return header, np.concatenate(chunks)


def reference_id(request: np.ndarray, data: np.ndarray) -> str:
    """The content id of an encoded reference (hex SHA-256 of header and bytes)."""
    digest = hashlib.sha256(_one_bytes(request, "request"))
    digest.update(np.ascontiguousarray(data, np.uint8).tobytes())
    return digest.hexdigest()


def decode_reference(request: np.ndarray, data: np.ndarray) -> tuple[Reference, np.ndarray]:
    """The `Reference` a register request describes and its annotated rendering;
    `InputError` when it is malformed."""
    header = read_header(request)
    image, offset = _take_image(header.get("image"), data, 0, "image")
    annotated, offset = _take_image(header.get("annotated"), data, offset, "annotated")
    if annotated.dtype != np.uint8 or annotated.shape != (*image.shape[:2], 3):
        raise InputError(f"annotated: expected uint8 {(*image.shape[:2], 3)}, got "
                         f"{annotated.dtype} {annotated.shape}")
    regions = []
    for n, item in enumerate(_field(header, "regions", list)):
        where = f"regions[{n}]"
        if not isinstance(item, dict):
            raise InputError(f"register: {where}: expected an object, got {type(item).__name__}")
        mask = None
        if item.get("mask"):
            count = image.shape[0] * image.shape[1]
            packed = (count + 7) // 8
            if offset + packed > data.size:
                raise InputError(f"register: {where}.mask: the data holds {data.size - offset} "
                                 f"bytes, a {image.shape[0]}x{image.shape[1]} mask needs "
                                 f"{packed}")
            bits = np.unpackbits(data[offset:offset + packed], count=count)
            mask, offset = bits.reshape(image.shape[:2]).astype(bool), offset + packed
        box = item.get("box")
        polygon = item.get("polygon")
        try:
            regions.append(Region(
                name=item.get("name"), mask=mask,
                box=None if box is None else tuple(int(v) for v in box),
                polygon=None if polygon is None else tuple((float(x), float(y))
                                                           for x, y in polygon)))
        except (TypeError, ValueError) as exc:
            raise InputError(f"register: {where}: {exc}") from None
    if offset != data.size:
        raise InputError(f"register: the data holds {data.size} bytes, the header describes "
                         f"{offset}")
    try:
        reference = Reference(image, tuple(regions), header.get("channel_order", "rgb"),
                              str(header.get("name", "reference")))
    except InputError as exc:
        raise InputError(f"register: {exc}") from None
    return reference, annotated


def encode_frame(frame: Frame | np.ndarray, reference_id: str, regions: Sequence[str] | None,
                 *, stream: str = "", deadline_unix_s: float | None = None,
                 channel_order: str = "rgb") -> tuple[np.ndarray, np.ndarray]:
    """`(request, data)` of a locate query: a frame (with its bit depth and VOI window), the
    reference id, the regions asked (None: all), the client's stream and its deadline."""
    if isinstance(frame, Frame):
        image, order = frame.image, frame.channel_order
        bits, window = frame.bits_stored, frame.window
    else:
        image, order = frame, channel_order if frame.ndim == 3 else "gray"
        bits, window = 8 * frame.dtype.itemsize, None
    image = np.ascontiguousarray(image)
    header = _header({"op": "locate", "reference_id": reference_id, "image": _image_header(image),
                      "channel_order": order, "bits_stored": int(bits),
                      "window": None if window is None else [float(v) for v in window],
                      "regions": None if regions is None else list(regions),
                      "stream": stream, "deadline_unix_s": deadline_unix_s})
    return header, image.reshape(-1).view(np.uint8)


def decode_frame(header: Mapping[str, object], data: np.ndarray) -> Frame:
    """The `Frame` of a locate request (header from `read_header`)."""
    image, offset = _take_image(header.get("image"), data, 0, "image")
    if offset != data.size:
        raise InputError(f"locate: the data holds {data.size} bytes, the image needs {offset}")
    window = header.get("window")
    try:
        return Frame(0, 0.0, image, str(header.get("channel_order")),
                     int(header.get("bits_stored", 8 * image.dtype.itemsize)),
                     None if window is None else (float(window[0]), float(window[1])))
    except (TypeError, ValueError, IndexError) as exc:
        raise InputError(f"locate: {exc}") from None


def read_header(request: np.ndarray) -> dict[str, object]:
    """The JSON header of a request tensor; `InputError` for anything else."""
    raw = _one_bytes(request, "request")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"request: not a JSON header ({exc})") from None
    if not isinstance(header, dict):
        raise InputError(f"request: expected a JSON object, got {type(header).__name__}")
    if header.get("protocol") != PROTOCOL:
        raise InputError(f"request: protocol {header.get('protocol')!r}, this server speaks "
                         f"{PROTOCOL}; use the same rau-rt version on both ends")
    if header.get("op") not in OPS:
        raise InputError(f"request: op must be one of {OPS}, got {header.get('op')!r}")
    return header


def encode_response(payload: Mapping[str, object]) -> np.ndarray:
    return np.array([json.dumps(payload).encode()], dtype=object)


def decode_response(response: np.ndarray) -> dict[str, object]:
    payload = json.loads(_one_bytes(response, "response"))
    if not isinstance(payload, dict):
        raise InputError(f"response: expected a JSON object, got {type(payload).__name__}")
    return payload


def result_payload(result: LocateResult) -> dict[str, object]:
    """A `LocateResult` as the JSON the server answers with."""
    return {"boxes": {n: None if b is None else [int(v) for v in b]
                      for n, b in result.boxes.items()},
            "reasons": dict(result.reasons), "text": result.text,
            "frame_size": list(result.frame_size), "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.generated_tokens, "stop_reason": result.stop_reason,
            "cached": result.cached, "timings_ms": dict(result.timings_ms)}


def result_from_payload(payload: Mapping[str, object],
                        timings_ms: Mapping[str, float] | None = None) -> LocateResult:
    """The `LocateResult` of a server's answer; `timings_ms` (the client's) replace the
    server's stage timings when given."""
    try:
        boxes = {str(n): None if b is None else (int(b[0]), int(b[1]), int(b[2]), int(b[3]))
                 for n, b in payload["boxes"].items()}
        height, width = payload["frame_size"]
        return LocateResult(
            boxes=boxes, reasons={str(k): str(v) for k, v in payload["reasons"].items()},
            text=str(payload["text"]), frame_size=(int(height), int(width)),
            prompt_tokens=int(payload["prompt_tokens"]),
            generated_tokens=int(payload["generated_tokens"]),
            stop_reason=str(payload["stop_reason"]), cached=bool(payload["cached"]),
            timings_ms=dict(timings_ms if timings_ms is not None else payload["timings_ms"]))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise InputError(f"response: not a localizer answer ({type(exc).__name__}: "
                         f"{exc})") from None


def _field(header: Mapping[str, object], name: str, kind: type) -> object:
    value = header.get(name)
    if not isinstance(value, kind):
        raise InputError(f"request: {name}: expected {kind.__name__}, got "
                         f"{type(value).__name__}")
    return value


def _one_bytes(tensor: np.ndarray, what: str) -> bytes:
    flat = np.asarray(tensor, dtype=object).reshape(-1)
    if flat.size != 1 or not isinstance(flat[0], (bytes, bytearray)):
        raise InputError(f"{what}: expected one BYTES element, got {flat.size} of "
                         f"{type(flat[0]).__name__ if flat.size else 'nothing'}")
    return bytes(flat[0])


def _take_image(spec: object, data: np.ndarray, offset: int,
                what: str) -> tuple[np.ndarray, int]:
    if not isinstance(spec, dict):
        raise InputError(f"request: {what}: expected {{'shape', 'dtype'}}, got {spec!r}")
    dtype = _DTYPES.get(spec.get("dtype"))
    shape = spec.get("shape")
    if dtype is None:
        raise InputError(f"{what}: dtype must be one of {sorted(_DTYPES)}, got "
                         f"{spec.get('dtype')!r}")
    if (not isinstance(shape, list) or len(shape) not in (2, 3)
            or not all(isinstance(v, int) for v in shape)
            or (len(shape) == 3 and shape[2] != 3)):
        raise InputError(f"{what}: shape must be (H, W) or (H, W, 3), got {shape!r}")
    # the runtime's frame-size bound (8192 px a side) before anything is allocated
    check_frame_size(shape[0], shape[1], what)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise InputError(f"data: expected 1-D uint8 bytes, got {data.dtype} {data.shape}")
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if offset + size > data.size:
        raise InputError(f"{what}: {shape} {spec['dtype']} needs {size} bytes, the data holds "
                         f"{data.size - offset}")
    image = data[offset:offset + size].view(dtype).reshape(shape).copy()
    return image, offset + size
