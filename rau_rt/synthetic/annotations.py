"""Ground-truth files: COCO with ARCADE's category names and the exact per-frame truth (JSON +
compressed masks). Readers of COCO and of the reference-annotation JSON are in rau_rt.io."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rau_rt.errors import InputError
from rau_rt.synthetic.anatomy import SEGMENT_TITLES, SEGMENTS
from rau_rt.synthetic.sequence import Sequence, polygon_of


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
