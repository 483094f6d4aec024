"""Ground-truth files: COCO with ARCADE's category names, the reference-annotation JSON, and
the exact per-frame truth (JSON + compressed masks)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rau_rt.errors import InputError
from rau_rt.synthetic.anatomy import SEGMENT_TITLES, SEGMENTS
from rau_rt.synthetic.sequence import Region, Sequence, polygon_of

REFERENCE_FORMAT = "rau-rt.reference-annotation"
REFERENCE_VERSION = 1


def coco_categories() -> list[dict[str, object]]:
    """ARCADE's syntax categories with the ids of its Zenodo release (1-25)."""
    return [{"id": i + 1, "name": name, "supercategory": SEGMENT_TITLES[name]}
            for i, name in enumerate(SEGMENTS)]


def _flat_polygons(mask: np.ndarray) -> list[list[float]]:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [c[:, 0, :].astype(float).ravel().tolist() for c in contours if len(c) >= 3]


def write_coco(path: str | Path, sequence: Sequence, file_names: list[str]) -> None:
    """One COCO image per frame, one annotation per opacified segment (polygons of the mask,
    bbox [x, y, w, h] of the same box as the truth)."""
    if len(file_names) != len(sequence.frames):
        raise InputError(f"file_names: expected {len(sequence.frames)}, got {len(file_names)}")
    size = sequence.meta.config.size
    ids = {name: i + 1 for i, name in enumerate(SEGMENTS)}
    images, annotations = [], []
    for truth, file_name in zip(sequence.truth, file_names, strict=True):
        images.append({"id": truth.index + 1, "file_name": file_name, "width": size,
                       "height": size})
        for name, seg in truth.segments.items():
            if seg.box is None:
                continue
            mask = seg.mask(size)
            x1, y1, x2, y2 = seg.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": truth.index + 1,
                "category_id": ids[name], "segmentation": _flat_polygons(mask),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()), "iscrowd": 0})
    coco = {"info": {"description": "rau-rt synthetic coronary angiography",
                     "seed": sequence.meta.config.seed},
            "images": images, "categories": coco_categories(), "annotations": annotations}
    Path(path).write_text(json.dumps(coco))


def read_coco(path: str | Path) -> dict[str, dict[str, list[tuple[int, int, int, int]]]]:
    """file_name -> category name -> boxes (x1, y1, x2, y2), categories matched by name, so a
    file whose ids are shifted (ARCADE's challenge files) reads the same."""
    coco = json.loads(Path(path).read_text())
    try:
        names = {c["id"]: c["name"] for c in coco["categories"]}
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        out: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {f: {} for f in
                                                                       files.values()}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            box = (round(x), round(y), round(x + w), round(y + h))
            out[files[ann["image_id"]]].setdefault(names[ann["category_id"]], []).append(box)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a COCO detection file ({exc!r})") from exc
    return out


@dataclass(frozen=True)
class ReferenceAnnotation:
    """The reference-annotation JSON: an image and its named regions (see the README)."""

    image: Path  # resolved against the JSON file's folder
    image_size: tuple[int, int]  # (width, height)
    regions: tuple[Region, ...]


def write_reference_annotation(path: str | Path, image: str, image_size: tuple[int, int],
                               regions: tuple[Region, ...] | list[Region]) -> None:
    """`image` is stored as given: relative paths are relative to the JSON file's folder."""
    doc = {"format": REFERENCE_FORMAT, "version": REFERENCE_VERSION, "image": image,
           "image_size": list(image_size), "regions": []}
    for region in regions:
        entry: dict[str, object] = {"name": region.name}
        if region.box is not None:
            entry["box"] = list(region.box)
        if region.polygon is not None:
            entry["polygon"] = [list(p) for p in region.polygon]
        doc["regions"].append(entry)
    Path(path).write_text(json.dumps(doc))


def read_reference_annotation(path: str | Path) -> ReferenceAnnotation:
    """Parse and check a reference-annotation JSON; InputError says what is wrong."""
    path = Path(path)
    doc = json.loads(path.read_text())
    if doc.get("format") != REFERENCE_FORMAT or doc.get("version") != REFERENCE_VERSION:
        raise InputError(f"{path}: expected format {REFERENCE_FORMAT!r} version "
                         f"{REFERENCE_VERSION}, got {doc.get('format')!r} {doc.get('version')!r}")
    try:
        width, height = (int(v) for v in doc["image_size"])
        regions = []
        for entry in doc["regions"]:
            box = tuple(int(v) for v in entry["box"]) if "box" in entry else None
            polygon = (tuple((float(x), float(y)) for x, y in entry["polygon"])
                       if "polygon" in entry else None)
            if box is None and polygon is None:
                raise InputError(f"{path}: region {entry['name']!r} needs a box or a polygon")
            if box is not None and not (0 <= box[0] < box[2] <= width
                                        and 0 <= box[1] < box[3] <= height):
                raise InputError(f"{path}: region {entry['name']!r} box {box}: expected "
                                 f"0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= {height}")
            regions.append(Region(str(entry["name"]), box, polygon))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: malformed reference annotation ({exc!r})") from exc
    return ReferenceAnnotation(path.parent / doc["image"], (width, height), tuple(regions))


def write_truth(folder: str | Path, sequence: Sequence) -> None:
    """truth.json (metadata; per frame and segment: box, present, opacified fraction,
    centerline, polygon) and masks.npz (label maps and every segment's exact masks)."""
    folder = Path(folder)
    meta = sequence.meta
    size = meta.config.size
    cfg = asdict(meta.config)
    cfg["view"] = None if meta.config.view is None else asdict(meta.config.view)
    doc = {
        "config": cfg, "view": asdict(meta.view), "view_name": meta.view.name,
        "segments": list(meta.segments), "pixel_spacing_mm": meta.pixel_spacing_mm,
        "imager_pixel_spacing_mm": meta.imager_pixel_spacing_mm, "window": list(meta.window),
        "contrast_start_frame": meta.contrast_start_frame,
        "stenoses": [asdict(s) for s in meta.stenoses],
        "box_convention": "x1 y1 x2 y2 pixels, x2/y2 exclusive",
        "frames": [],
    }
    masks = {name: np.zeros((len(sequence.frames), size, size), bool) for name in meta.segments}
    for truth in sequence.truth:
        segments = {}
        for name, seg in truth.segments.items():
            mask = seg.mask(size)
            masks[name][truth.index] = mask
            segments[name] = {
                "box": None if seg.box is None else list(seg.box), "present": seg.present,
                "opacified_fraction": round(seg.opacified_fraction, 4),
                "centerline": np.round(seg.centerline, 2).tolist(),
                "polygon": None if seg.box is None else polygon_of(mask)}
        doc["frames"].append({"index": truth.index, "time_s": truth.time_s,
                              "segments": segments})
    (folder / "truth.json").write_text(json.dumps(doc))
    labels = np.stack([t.labels for t in sequence.truth])
    np.savez_compressed(folder / "masks.npz", labels=labels, size=np.array(size),
                        **{f"mask_{n}": np.packbits(m, axis=-1) for n, m in masks.items()})


def read_masks(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(label maps (frames, size, size) uint8, segment name -> (frames, size, size) bool)."""
    with np.load(path) as data:
        size = int(data["size"])
        masks = {key[5:]: np.unpackbits(data[key], axis=-1, count=size).astype(bool)
                 for key in data.files if key.startswith("mask_")}
        return data["labels"], masks
