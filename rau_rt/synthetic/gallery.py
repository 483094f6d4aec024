"""A gallery for judging realism: frames of two sequences, the last with its truth outlined.

    python -m rau_rt.synthetic.gallery --out docs/synthetic_gallery.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from rau_rt.synthetic.anatomy import SEGMENTS
from rau_rt.synthetic.projection import View
from rau_rt.synthetic.sequence import Sequence, generate_sequence

TILE = 384  # px per shown frame (512² frames scaled down)
# (seed, artery, dominance, view): a left and a right coronary injection
SHOWN = ((0, "left", "right", View(-30.0, -25.0)), (1, "right", "right", View(40.0, 20.0)))


def _colour(name: str) -> tuple[int, int, int]:
    hue = int(179 * (SEGMENTS.index(name) * 0.38 % 1.0))
    hsv = np.uint8([[[hue, 220, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _tile(image8: np.ndarray, caption: str) -> np.ndarray:
    tile = cv2.cvtColor(cv2.resize(image8, (TILE, TILE), interpolation=cv2.INTER_AREA),
                        cv2.COLOR_GRAY2BGR)
    cv2.putText(tile, caption, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                cv2.LINE_AA)
    return tile


def _outlined(sequence: Sequence, index: int) -> np.ndarray:
    size = sequence.meta.config.size
    scale = TILE / size
    tile = _tile(sequence.frames_8bit()[index], f"frame {index}: truth")
    for name, seg in sequence.truth[index].segments.items():
        if seg.box is None:
            continue
        contours, _ = cv2.findContours(seg.mask(size).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        scaled = [np.round(c * scale).astype(np.int32) for c in contours]
        cv2.drawContours(tile, scaled, -1, _colour(name), 1, cv2.LINE_AA)
        x, y = np.round(seg.centerline[len(seg.centerline) // 2] * scale).astype(int)
        cv2.putText(tile, name, (int(x) + 4, int(y)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    _colour(name), 1, cv2.LINE_AA)
    return tile


def render_gallery(frames: int = 48) -> np.ndarray:
    """Rows: sequences; columns: empty frame, filling, filled, filled with truth outlines."""
    rows = []
    for seed, artery, dominance, view in SHOWN:
        seq = generate_sequence(seed, frames, 512, 15.0, view, dominance, artery=artery)
        start = seq.meta.contrast_start_frame
        filling = next((t.index for t in seq.truth if t.index > start and not all(
            s.present for s in t.segments.values())), start)
        filling = min(filling + 3, frames - 1)
        label = f"{artery} coronary, {view.name}"
        v = seq.frames_8bit()
        rows.append(np.hstack([_tile(v[0], f"frame 0: {label}"),
                               _tile(v[filling], f"frame {filling}: filling"),
                               _tile(v[frames - 1], f"frame {frames - 1}: filled"),
                               _outlined(seq, frames - 1)]))
    return np.vstack(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/synthetic_gallery.png"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), render_gallery(), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
