"""Reading reference annotations: the project's JSON, COCO (ARCADE names), and mask PNGs.

The project's JSON (`rau-rt.reference-annotation`, version 1; README "Synthetic data"):

    {"format": "rau-rt.reference-annotation", "version": 1,
     "image": "reference.png", "image_size": [width, height],
     "regions": [{"name": "6", "box": [x1, y1, x2, y2], "polygon": [[x, y], ...],
                  "mask": "masks/6.png"}, ...]}

`image` and `mask` paths are relative to the JSON file's folder; a region needs at least one of
box, polygon, mask. Every problem raises `AnnotationError` naming the JSON path of the offending
item (`$.regions[2].box`) and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from rau_rt.errors import AnnotationError, InputError
from rau_rt.types import MAX_FRAME_SIDE, Box, Region, check_region_name

REFERENCE_FORMAT = "rau-rt.reference-annotation"
REFERENCE_VERSION = 1


@dataclass(frozen=True)
class ReferenceAnnotation:
    """An annotated reference image: its path, size and named regions."""

    image: Path  # resolved against the JSON file's folder
    image_size: tuple[int, int]  # (width, height)
    regions: tuple[Region, ...]

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise AnnotationError(f"{self.image}: no region {name!r}; annotated: "
                              f"{[r.name for r in self.regions]}")


def _fail(path: Path, where: str, message: str) -> AnnotationError:
    return AnnotationError(f"{path}: {where}: {message}")


def _load_json(path: Path) -> object:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}, column "
                              f"{exc.colno})") from exc


def _number_list(path: Path, where: str, value: object, length: int | None) -> list[float]:
    if not isinstance(value, list) or any(
            isinstance(v, bool) or not isinstance(v, int | float) for v in value):
        raise _fail(path, where, f"expected a list of numbers, got {json.dumps(value)[:60]}")
    if length is not None and len(value) != length:
        raise _fail(path, where, f"expected {length} numbers, got {len(value)}")
    return [float(v) for v in value]


def _box(path: Path, where: str, value: object, width: int, height: int) -> Box:
    x1, y1, x2, y2 = _number_list(path, where, value, 4)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise _fail(path, where, f"box {[x1, y1, x2, y2]}: expected 0 <= x1 < x2 <= {width} and "
                                 f"0 <= y1 < y2 <= {height} (x2, y2 exclusive)")
    return round(x1), round(y1), round(x2), round(y2)


def _polygon(path: Path, where: str, value: object, width: int,
             height: int) -> tuple[tuple[float, float], ...]:
    if not isinstance(value, list) or len(value) < 3:
        raise _fail(path, where, "expected a polygon of at least 3 [x, y] vertices")
    points = tuple(tuple(_number_list(path, f"{where}[{k}]", p, 2)) for k, p in enumerate(value))
    for k, (x, y) in enumerate(points):
        if not (0 <= x <= width and 0 <= y <= height):
            raise _fail(path, f"{where}[{k}]", f"vertex ({x}, {y}) lies outside the "
                                               f"{width}x{height} image")
    return points  # type: ignore[return-value]


def _mask(path: Path, where: str, value: object, width: int, height: int) -> np.ndarray:
    if not isinstance(value, str):
        raise _fail(path, where, "expected the path of a mask PNG")
    image = cv2.imread(str(path.parent / value), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise _fail(path, where, f"{value}: not a readable image")
    if image.shape[:2] != (height, width):
        raise _fail(path, where, f"{value}: mask is {image.shape[1]}x{image.shape[0]}, the image "
                                 f"is {width}x{height}")
    mask = (image if image.ndim == 2 else image.max(axis=2)) > 0
    if not mask.any():
        raise _fail(path, where, f"{value}: the mask is empty")
    return mask


def read_reference_annotation(
    path: str | Path, known_regions: Iterable[str] | None = None
) -> ReferenceAnnotation:
    """Parse and check the project's reference-annotation JSON.

    Args:
        path: the JSON file.
        known_regions: if given, every region name must be one of these (e.g. ARCADE's
            segment names), so a typo fails here rather than as a region never found.

    Raises:
        AnnotationError: naming the JSON path of the offending item and what was expected.
    """
    path = Path(path)
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise _fail(path, "$", f"expected an object, got {type(doc).__name__}")
    if doc.get("format") != REFERENCE_FORMAT or doc.get("version") != REFERENCE_VERSION:
        raise _fail(path, "$.format", f"expected {REFERENCE_FORMAT!r} version "
                                      f"{REFERENCE_VERSION}, got {doc.get('format')!r} "
                                      f"{doc.get('version')!r}")
    if not isinstance(doc.get("image"), str):
        raise _fail(path, "$.image", "expected the reference image's path (a string)")
    size = _number_list(path, "$.image_size", doc.get("image_size"), 2)
    if not all(math.isfinite(v) and v == int(v) and 1 <= v <= MAX_FRAME_SIDE for v in size):
        raise _fail(path, "$.image_size", f"expected whole [width, height] of 1 to "
                                          f"{MAX_FRAME_SIDE} pixels, got {size}")
    width, height = (int(v) for v in size)
    entries = doc.get("regions")
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "$.regions", "expected a non-empty list of regions")
    known = set(known_regions) if known_regions is not None else None
    regions, seen = [], set()
    for k, entry in enumerate(entries):
        where = f"$.regions[{k}]"
        if not isinstance(entry, dict):
            raise _fail(path, where, f"expected an object, got {type(entry).__name__}")
        name = entry.get("name")
        try:
            check_region_name(name)
        except InputError as exc:
            raise _fail(path, f"{where}.name", str(exc)) from None
        if known is not None and name not in known:
            raise _fail(path, f"{where}.name", f"unknown region {name!r}; expected one of "
                                               f"{sorted(known)}")
        if name in seen:
            raise _fail(path, f"{where}.name", f"region {name!r} is annotated twice")
        seen.add(name)
        if not {"box", "polygon", "mask"} & set(entry):
            raise _fail(path, where, f"region {name!r} needs a box, a polygon or a mask")
        regions.append(Region(
            name,
            _box(path, f"{where}.box", entry["box"], width, height) if "box" in entry else None,
            _polygon(path, f"{where}.polygon", entry["polygon"], width, height)
            if "polygon" in entry else None,
            _mask(path, f"{where}.mask", entry["mask"], width, height)
            if "mask" in entry else None,
        ))
    return ReferenceAnnotation(path.parent / doc["image"], (width, height), tuple(regions))


def load_reference_image(annotation: ReferenceAnnotation) -> np.ndarray:
    """The annotated image as uint8, (H, W) gray or (H, W, 3) BGR, checked against the JSON's
    image_size.

    A 16-bit image (X-ray) is scaled to 8 bits by its highest stored bit, not windowed: save an
    8-bit (windowed) reference to control the contrast the models see.
    """
    image = cv2.imread(str(annotation.image), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise AnnotationError(f"{annotation.image}: the reference image is missing or not "
                              "readable")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype == np.uint16:
        bits = max(int(image.max()).bit_length(), 8)
        image = np.clip(image / ((1 << bits) - 1) * 255 + 0.5, 0, 255).astype(np.uint8)
    if image.dtype != np.uint8:
        raise AnnotationError(f"{annotation.image}: expected 8- or 16-bit pixels, got "
                              f"{image.dtype}")
    height, width = image.shape[:2]
    if (width, height) != tuple(annotation.image_size):
        raise AnnotationError(f"{annotation.image}: the annotation's image_size is "
                              f"{list(annotation.image_size)}, the image {width}x{height}")
    return image


def write_reference_annotation(path: str | Path, image: str, image_size: tuple[int, int],
                               regions: Iterable[Region]) -> None:
    """Write the project's JSON. `image` is stored as given (relative to the JSON's folder).

    Masks are not embedded: a region with only a mask is written by box (from the mask).
    """
    from rau_rt.geometry import box_from_mask

    doc: dict[str, object] = {"format": REFERENCE_FORMAT, "version": REFERENCE_VERSION,
                              "image": image, "image_size": list(image_size), "regions": []}
    for region in regions:
        entry: dict[str, object] = {"name": region.name}
        box = region.box
        if box is None and region.polygon is None and region.mask is not None:
            box = box_from_mask(region.mask)
        if box is not None:
            entry["box"] = list(box)
        if region.polygon is not None:
            entry["polygon"] = [list(p) for p in region.polygon]
        doc["regions"].append(entry)  # type: ignore[union-attr]
    Path(path).write_text(json.dumps(doc))


def read_coco(path: str | Path) -> dict[str, dict[str, list[Box]]]:
    """file_name -> category name -> boxes (x1, y1, x2, y2, exclusive).

    Categories are matched by name, never by id: ARCADE's challenge-phase file shifts its ids
    by one (`catether` at id 1), so the same names must read the same from either file.
    """
    path = Path(path)
    coco = _load_json(path)
    if not isinstance(coco, dict):
        raise _fail(path, "$", "expected a COCO object")
    for key in ("images", "categories", "annotations"):
        if not isinstance(coco.get(key), list):
            raise _fail(path, f"$.{key}", "expected a list")
    names, files = {}, {}
    for k, category in enumerate(coco["categories"]):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise _fail(path, f"$.categories[{k}]", "expected an object with id and name")
        names[category["id"]] = str(category["name"])
    for k, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise _fail(path, f"$.images[{k}]", "expected an object with id and file_name")
        files[image["id"]] = str(image["file_name"])
    out: dict[str, dict[str, list[Box]]] = {name: {} for name in files.values()}
    for k, ann in enumerate(coco["annotations"]):
        where = f"$.annotations[{k}]"
        if not isinstance(ann, dict):
            raise _fail(path, where, "expected an object")
        if ann.get("image_id") not in files:
            raise _fail(path, f"{where}.image_id", f"no image with id {ann.get('image_id')!r}")
        if ann.get("category_id") not in names:
            raise _fail(path, f"{where}.category_id",
                        f"no category with id {ann.get('category_id')!r}")
        x, y, w, h = _number_list(path, f"{where}.bbox", ann.get("bbox"), 4)
        if not (all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0):
            raise _fail(path, f"{where}.bbox", f"expected finite numbers with a positive width "
                                               f"and height, got "
                                               f"{[x, y, w, h]}")
        # outward to whole pixels: a sub-pixel box stays non-empty (integer boxes are unchanged)
        box = (math.floor(x), math.floor(y), math.ceil(x + w), math.ceil(y + h))
        out[files[ann["image_id"]]].setdefault(names[ann["category_id"]], []).append(box)
    return out


def read_mask_pngs(folder: str | Path) -> tuple[Region, ...]:
    """One region per `<name>.png` in `folder` (non-zero pixels inside), box from the mask."""
    from rau_rt.geometry import box_from_mask

    folder = Path(folder)
    files = sorted(folder.glob("*.png"))
    if not files:
        raise AnnotationError(f"{folder}: no <region>.png mask files")
    regions = []
    for file in files:
        image = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise AnnotationError(f"{file}: not a readable image")
        mask = (image if image.ndim == 2 else image.max(axis=2)) > 0
        box = box_from_mask(mask)
        if box is None:
            raise AnnotationError(f"{file}: the mask of region {file.stem!r} is empty")
        try:
            regions.append(Region(file.stem, box, None, mask))
        except InputError as exc:
            raise AnnotationError(f"{file}: {exc}") from None
    return tuple(regions)
