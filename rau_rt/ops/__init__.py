"""Pre/post-processing ops, native (`rau_rt._native`) with a NumPy reference for each.

Every op `f` has `f_reference`, the NumPy/OpenCV implementation used when the extension is absent
(or `RAU_RT_NATIVE=0`) and as the test oracle. The extension is loaded by `runtime`, its only
importer.
"""

from rau_rt.ops._bilinear import resize_antialias
from rau_rt.ops.postprocessing import (
    PALETTE,
    MaskSet,
    fill_holes,
    fill_holes_reference,
    overlay,
    overlay_reference,
    postprocess_masks,
    postprocess_masks_reference,
)
from rau_rt.ops.preprocessing import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VlmImage,
    preprocess,
    preprocess_reference,
    resize_for_vlm,
    smart_resize,
)
from rau_rt.ops.runtime import (
    native_available,
    native_info,
    num_threads,
    physical_cores,
    set_num_threads,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PALETTE",
    "MaskSet",
    "VlmImage",
    "fill_holes",
    "fill_holes_reference",
    "native_available",
    "native_info",
    "num_threads",
    "overlay",
    "overlay_reference",
    "physical_cores",
    "postprocess_masks",
    "postprocess_masks_reference",
    "preprocess",
    "preprocess_reference",
    "resize_antialias",
    "resize_for_vlm",
    "set_num_threads",
    "smart_resize",
]
