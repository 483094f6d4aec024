"""Synthetic X-ray coronary angiography cines with exact per-segment ground truth.

`generate_sequence` renders a cine run (frames as 12-bit uint16, per-frame truth, metadata);
`make_reference` a contrast-filled still of another patient with annotated regions; `formats` and
`annotations` write DICOM, FFV1/MKV, PNG, COCO and the exact truth (rau_rt.io reads them back).
"""

from rau_rt.synthetic.anatomy import SEGMENT_TITLES, SEGMENTS, segments_of
from rau_rt.synthetic.dynamics import Motion
from rau_rt.synthetic.look import LOOKS, Look
from rau_rt.synthetic.projection import View
from rau_rt.synthetic.sequence import (
    FrameTruth,
    Reference,
    Region,
    SegmentTruth,
    Sequence,
    SequenceConfig,
    SequenceMeta,
    SequenceStream,
    generate_sequence,
    make_reference,
    render_frames,
    sequence_config,
)

__all__ = [
    "LOOKS",
    "SEGMENTS",
    "SEGMENT_TITLES",
    "FrameTruth",
    "Look",
    "Motion",
    "Reference",
    "Region",
    "SegmentTruth",
    "Sequence",
    "SequenceConfig",
    "SequenceMeta",
    "SequenceStream",
    "View",
    "generate_sequence",
    "make_reference",
    "render_frames",
    "segments_of",
    "sequence_config",
]
