"""What the runtime needs to drive an exported SAM2 bundle besides its four graphs.

`rau-rt export sam2` writes `sam2.json` next to `manifest.json`; `Sam2Layout` is its content:
the sizes the graphs were built for, the video predictor's post-processing settings that decide
which mask token is kept (they depend on the prompt, not on tensors, so they are not in a graph),
and the 16 weights of `SAM2Base.mask_downsample`, the 4x4 stride-4 convolution sam2 applies to a
mask prompt (an annotated reference) before its prompt encoder: too small for a graph of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rau_rt.errors import BundleError
from rau_rt.sidecar import read_json, write_json

LAYOUT_FILE = "sam2.json"
LAYOUT_VERSION = 2

# The memory sam2's video predictor attends to per frame: its conditioning frames, the tracked
# frames t-6 ... t-1 (num_maskmem 7) and the pointers of t-1 ... t-15 (max_obj_ptrs_in_encoder
# 16). The exported memory_attention takes them compacted, within these ranges (a TensorRT
# profile's max); the tracker keeps at most MAX_CONDITIONING conditioning frames.
RECENT_SLOTS = 6
RECENT_POINTERS = 15
MAX_CONDITIONING = 4
MAX_SLOTS = MAX_CONDITIONING + RECENT_SLOTS
MAX_POINTERS = MAX_CONDITIONING + RECENT_POINTERS
CONDITIONING_TPOS = RECENT_SLOTS  # row of maskmem_tpos_enc for a conditioning frame
MAX_REGIONS = 16  # regions per batched call (the graphs' region range)
# Memory token pooling (the tracker's `memory_pool` lever): a second memory attention graph
# whose cross-attention averages each memory frame's keys and values over MEMORY_POOL x
# MEMORY_POOL blocks (export/sam2/model.py `RealRoPEAttention`); same inputs and outputs.
POOLED_MEMORY_ATTENTION = "memory_attention_pooled"
MEMORY_POOL = 2
# Windowed memory attention (the tracker's `memory_window` lever): a third graph that conditions
# only a square of the frame's tokens, each region its own, of side (S/16) / MEMORY_WINDOW (a
# quarter of the tokens): memory_attention's inputs plus `window_index`.
WINDOWED_MEMORY_ATTENTION = "memory_attention_window"
MEMORY_WINDOW = 2


def window_side(side: int) -> int:
    """The side W of the windowed memory attention's square (in tokens) on a side x side grid."""
    return side // MEMORY_WINDOW


def window_index(box: np.ndarray, side: int) -> np.ndarray:
    """Row-major token indices [W*W] of the windowed memory attention's square on a side x side
    grid, centred on `box` (x1 y1 x2 y2 in grid units) and kept inside the grid."""
    window = window_side(side)
    x0, y0 = (int(np.clip(np.floor((box[i] + box[i + 2] - window) / 2 + 0.5), 0,
                          side - window)) for i in (0, 1))
    rows, cols = np.meshgrid(np.arange(y0, y0 + window), np.arange(x0, x0 + window),
                             indexing="ij")
    return (rows * side + cols).ravel().astype(np.int64)


@dataclass(frozen=True)
class Sam2Layout:
    """`sam2.json`: the contract between an exported SAM2 bundle and the Tracker.

    Attributes:
        image_size: S, the square model input; masks are S/4, features S/16.
        hidden_dim, memory_dim: D and M (object pointer and spatial memory channels).
        fill_hole_area: sam2's `fill_hole_area` (8 with the video predictor's post-processing):
            background specks of at most this many low-res pixels become foreground.
        multimask_stability: sam2's `dynamic_multimask_via_stability` for single-mask outputs
            (a box): token 0 unless its stability is under `stability_threshold`.
        stability_delta, stability_threshold: 0.05 and 0.98 in every sam2.1 config.
        mask_downsample_weight: the (4, 4) kernel of `mask_downsample`, row-major.
        mask_downsample_bias: its bias.
        memory_pool: the memory token pooling the weights were trained with (1: sam2's memory
            attention; MEMORY_POOL: `rau-rt train sam2 --memory-pool 2`). The tracker warns
            when its `memory_pool` lever differs: such weights lose accuracy.
    """

    image_size: int
    hidden_dim: int
    memory_dim: int
    fill_hole_area: int
    multimask_stability: bool
    stability_delta: float
    stability_threshold: float
    mask_downsample_weight: tuple[float, ...]
    mask_downsample_bias: float
    memory_pool: int = 1
    version: int = LAYOUT_VERSION

    @property
    def low_res(self) -> int:
        """Side of the decoder's mask logits (S/4)."""
        return self.image_size // 4

    def mask_downsample(self, masks: np.ndarray) -> np.ndarray:
        """`mask_downsample` on (N, S, S) float32 masks -> (N, 1, S/4, S/4), in float32.

        Each output pixel is the 4x4 block under it times the kernel plus the bias (stride 4,
        no padding: the blocks tile the image).
        """
        n, side = masks.shape[0], self.low_res
        blocks = masks.reshape(n, side, 4, side, 4).transpose(0, 1, 3, 2, 4).reshape(
            n, side, side, 16)
        kernel = np.asarray(self.mask_downsample_weight, np.float32)
        out = blocks @ kernel + np.float32(self.mask_downsample_bias)
        return out.astype(np.float32, copy=False)[:, None]

def write_layout(directory: str | Path, layout: Sam2Layout) -> Path:
    """Write `sam2.json` into a bundle directory."""
    return write_json(Path(directory) / LAYOUT_FILE, asdict(layout))


def read_layout(directory: str | Path) -> Sam2Layout:
    """Read `sam2.json` of a bundle.

    Raises:
        BundleError: missing (a bundle exported before the layout file existed), malformed, or
            another layout version.
    """
    path = Path(directory) / LAYOUT_FILE
    data = read_json(path, "the tracker needs it (the mask-token settings and mask_downsample "
                           "weights): re-export the bundle with rau-rt export sam2")
    try:
        if data.get("version") != LAYOUT_VERSION:
            raise BundleError(f"{path}: layout version {data.get('version')}, this rau-rt reads "
                              f"{LAYOUT_VERSION}; re-export the bundle")
        data["mask_downsample_weight"] = tuple(data["mask_downsample_weight"])
        layout = Sam2Layout(**data)
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"{path}: malformed ({exc}); re-export the bundle") from exc
    if len(layout.mask_downsample_weight) != 16 or layout.image_size % 16:
        raise BundleError(f"{path}: expected a 4x4 mask_downsample kernel and an image size "
                          f"divisible by 16, got {len(layout.mask_downsample_weight)} weights and "
                          f"{layout.image_size}; re-export the bundle")
    if layout.memory_pool not in (1, MEMORY_POOL):
        raise BundleError(f"{path}: memory_pool {layout.memory_pool!r}, expected 1 or "
                          f"{MEMORY_POOL}; re-export the bundle")
    return layout
