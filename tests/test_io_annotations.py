"""Reference annotations: the project's JSON, COCO by category name, mask PNGs, and errors
that name the JSON path of the offending item."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from rau_rt.errors import AnnotationError, InputError
from rau_rt.io import annotations as ann
from rau_rt.synthetic import SEGMENTS, generate_sequence
from rau_rt.synthetic.annotations import write_coco
from rau_rt.types import Region


def test_reference_annotation_round_trip(tmp_path):
    regions = (Region("6", (10, 20, 30, 40), ((10.0, 20.0), (29.0, 39.0), (12.0, 35.0))),
               Region("11", (1, 2, 3, 4), None), Region("13", None, ((5, 5), (9, 9), (5, 9))))
    ann.write_reference_annotation(tmp_path / "ref.json", "ref.png", (64, 48), regions)
    loaded = ann.read_reference_annotation(tmp_path / "ref.json", known_regions=SEGMENTS)
    assert loaded.image == tmp_path / "ref.png" and loaded.image_size == (64, 48)
    assert loaded.regions == regions
    assert loaded.region("11").box == (1, 2, 3, 4)
    with pytest.raises(AnnotationError, match="no region '5'"):
        loaded.region("5")


def test_masks_are_read_relative_to_the_json(tmp_path):
    mask = np.zeros((48, 64), np.uint8)
    mask[10:20, 30:40] = 255
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "masks" / "6.png"), mask)
    doc = {"format": ann.REFERENCE_FORMAT, "version": 1, "image": "r.png",
           "image_size": [64, 48], "regions": [{"name": "6", "mask": "masks/6.png"}]}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    region = ann.read_reference_annotation(tmp_path / "r.json").regions[0]
    assert region.mask.dtype == bool and region.mask.sum() == 100 and region.box is None
    (folder_region,) = ann.read_mask_pngs(tmp_path / "masks")
    assert folder_region.name == "6" and folder_region.box == (30, 10, 40, 20)


def _write(tmp_path, doc) -> object:
    path = tmp_path / "r.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _doc(*regions, **top):
    return {"format": ann.REFERENCE_FORMAT, "version": 1, "image": "r.png",
            "image_size": [64, 48], "regions": list(regions), **top}


@pytest.mark.parametrize(
    ("doc", "where", "message"),
    [
        ("{not json", "not JSON", "line 1"),
        ([1, 2], r"\$", "expected an object"),
        (_doc({"name": "6", "box": [1, 1, 5, 5]}, format="other"), r"\$\.format", "expected"),
        (_doc({"name": "6", "box": [1, 1, 5, 5]}, image=3), r"\$\.image", "string"),
        (_doc({"name": "6", "box": [1, 1, 5, 5]}, image_size="64x48"), r"\$\.image_size",
         "list of numbers"),
        (_doc(), r"\$\.regions", "non-empty list"),
        (_doc("6"), r"\$\.regions\[0\]", "expected an object"),
        (_doc({"box": [1, 1, 5, 5]}), r"\$\.regions\[0\]\.name", "expected a string"),
        (_doc({"name": "6"}), r"\$\.regions\[0\]", "needs a box, a polygon or a mask"),
        (_doc({"name": "6", "box": [1, 1, 5, 5]}, ), None, None),  # valid: control
        (_doc({"name": "6", "box": [1, 1, 5, 5]}, {"name": "99", "box": [1, 1, 5, 5]}),
         r"\$\.regions\[1\]\.name", "unknown region '99'"),
        (_doc({"name": "6", "box": [1, 1, 5, 5]}, {"name": "6", "box": [2, 2, 5, 5]}),
         r"\$\.regions\[1\]\.name", "annotated twice"),
        (_doc({"name": "6", "box": [10, 10, 5, 20]}), r"\$\.regions\[0\]\.box", "x1 < x2"),
        (_doc({"name": "6", "box": [0, 0, 80, 20]}), r"\$\.regions\[0\]\.box", "<= 64"),
        (_doc({"name": "6", "box": [0, 0, 8]}), r"\$\.regions\[0\]\.box", "4 numbers"),
        (_doc({"name": "6", "box": [0, 0, "8", 9]}), r"\$\.regions\[0\]\.box", "numbers"),
        (_doc({"name": "6", "polygon": []}), r"\$\.regions\[0\]\.polygon", "at least 3"),
        (_doc({"name": "6", "polygon": [[1, 1], [2, 2], [99, 3]]}),
         r"\$\.regions\[0\]\.polygon\[2\]", "outside"),
        (_doc({"name": "6", "mask": "missing.png"}), r"\$\.regions\[0\]\.mask", "not a readable"),
    ],
)
def test_malformed_reference_annotations_name_the_json_path(tmp_path, doc, where, message):
    path = _write(tmp_path, doc)
    if where is None:
        assert ann.read_reference_annotation(path, known_regions=SEGMENTS).regions[0].name == "6"
        return
    with pytest.raises(AnnotationError, match=f"{where}.*{message}") as info:
        ann.read_reference_annotation(path, known_regions=SEGMENTS)
    assert isinstance(info.value, InputError) and str(path) in str(info.value)


@pytest.fixture(scope="module")
def sequence():
    # 24 frames at 7.5 fps: the bolus fills the segments by the last frame
    return generate_sequence(seed=9, frames=24, size=64, fps=7.5, segments=("5", "6", "11"))


def test_coco_reader_matches_by_name_when_ids_are_shifted(sequence, tmp_path):
    names = [f"frame_{k:05d}.png" for k in range(24)]
    path = tmp_path / "coco.json"
    write_coco(path, sequence, names)
    expected = ann.read_coco(path)
    coco = json.loads(path.read_text())
    # ARCADE's challenge files put "catether" at id 1 and shift every segment's id by one
    for c in coco["categories"]:
        c["id"] += 1
    coco["categories"].insert(0, {"id": 1, "name": "catether"})
    for a in coco["annotations"]:
        a["category_id"] += 1
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps(coco))
    assert ann.read_coco(shifted) == expected
    last = sequence.truth[-1].segments
    assert all(last[name].box is not None for name in ("5", "6", "11"))
    assert {name: boxes[0] for name, boxes in expected[names[-1]].items()} == {
        name: seg.box for name, seg in last.items()}


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda c: c.pop("images"), r"\$\.images"),
        (lambda c: c["annotations"][0].update(category_id=999), r"\$\.annotations\[0\]\.category"),
        (lambda c: c["annotations"][0].update(image_id=999), r"\$\.annotations\[0\]\.image_id"),
        (lambda c: c["annotations"][0].update(bbox=[1, 2, 0, 3]), r"\$\.annotations\[0\]\.bbox"),
    ],
)
def test_malformed_coco_names_the_json_path(sequence, tmp_path, mutate, where):
    path = tmp_path / "coco.json"
    write_coco(path, sequence, [f"f{k}.png" for k in range(24)])
    coco = json.loads(path.read_text())
    mutate(coco)
    path.write_text(json.dumps(coco))
    with pytest.raises(AnnotationError, match=where):
        ann.read_coco(path)
