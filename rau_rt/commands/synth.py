"""`rau-rt synth`: write a synthetic cine, its ground truth and an annotated reference.

CLI glue: it wires the generator to the project's annotation format in rau_rt.io.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from rau_rt.errors import InputError
from rau_rt.io.annotations import write_reference_annotation
from rau_rt.synthetic import annotations, formats
from rau_rt.synthetic.anatomy import ARTERIES, DOMINANCES
from rau_rt.synthetic.dynamics import Motion
from rau_rt.synthetic.look import LOOKS, look_named
from rau_rt.synthetic.projection import View
from rau_rt.synthetic.sequence import SequenceConfig, generate_sequence, make_reference


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = SequenceConfig()
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--frames", type=int, default=defaults.frames)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--format", choices=formats.FORMATS, default="dicom",
                        help="frames as multi-frame XA DICOM, FFV1 MKV or 16-bit PNGs")
    parser.add_argument("--size", type=int, default=defaults.size,
                        help="square frame size, a multiple of 16")
    parser.add_argument("--fps", type=float, default=defaults.fps, help="7.5, 15 or 30")
    parser.add_argument("--view", type=View.parse, default=None,
                        help="PRIMARY,SECONDARY degrees (LAO+/RAO-, CRA+/CAU-); default random")
    parser.add_argument("--artery", choices=ARTERIES, default=defaults.artery)
    parser.add_argument("--dominance", choices=DOMINANCES, default=defaults.dominance)
    parser.add_argument("--segments", default=None,
                        help="comma-separated ARCADE names, e.g. 5,6,7,11; default all")
    parser.add_argument("--stenoses", type=int, default=defaults.stenoses)
    parser.add_argument("--look", choices=sorted(LOOKS), default=defaults.look,
                        help="clinical: toward real cines (motion, noise, wires, collimation); "
                             "classic: the first generator's look")
    parser.add_argument("--cardiac-px", type=float, default=None,
                        help="default: the look's (clinical 32, classic 15)")
    parser.add_argument("--respiratory-px", type=float, default=None,
                        help="default: the look's (clinical 16, classic 6)")
    parser.add_argument("--heart-rate", type=float, default=None, help="bpm (default 72)")
    parser.add_argument("--contrast-delay-frames", type=int, default=None)
    parser.add_argument("--no-catheter", action="store_true")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    segments = tuple(s.strip() for s in args.segments.split(",")) if args.segments else None
    base = look_named(args.look).motion
    motion = Motion(*(base_value if value is None else value for value, base_value in (
        (args.cardiac_px, base.cardiac_px), (args.respiratory_px, base.respiratory_px),
        (args.heart_rate, base.heart_rate_bpm))))
    # validate every argument before any work or any file
    SequenceConfig(args.seed, args.frames, args.size, args.fps, args.view, args.artery,
                   args.dominance, motion, segments, args.stenoses,
                   args.contrast_delay_frames, not args.no_catheter, args.look)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: expected a folder, found a file")
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=args.frames, desc="synth", unit="frame") as bar:
        sequence = generate_sequence(
            args.seed, args.frames, args.size, args.fps, args.view, args.dominance, motion,
            artery=args.artery, segments=segments, stenoses=args.stenoses,
            contrast_delay_frames=args.contrast_delay_frames, catheter=not args.no_catheter,
            look=args.look, progress=bar.update)
    written = formats.write_frames(out, sequence, args.format)
    names = [f"frame_{k:05d}.png" for k in range(args.frames)]
    annotations.write_coco(out / "coco.json", sequence, names)
    annotations.write_truth(out, sequence)
    reference = make_reference(args.seed, args.size, artery=args.artery,
                               dominance=args.dominance, segments=segments,
                               avoid_view=sequence.meta.view, look=args.look)
    cv2.imwrite(str(out / "reference.png"), reference.image_8bit())
    cv2.imwrite(str(out / "reference_12bit.png"), reference.image)
    write_reference_annotation(out / "reference.json", "reference.png", (args.size, args.size),
                               reference.regions)
    print(f"{written}: {args.frames} frames {args.size}x{args.size} at {args.fps:g} fps, "
          f"{sequence.meta.view.name}; truth.json, masks.npz, coco.json; reference "
          f"({reference.view.name}) with {len(reference.regions)} regions in reference.json")
    return 0
