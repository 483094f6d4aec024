"""What the runtime needs to drive an exported Qwen-VL bundle, without torch or transformers.

`rau-rt export vlm` writes `vlm.json` next to `manifest.json`; `VlmLayout` is its content: the
family's image-processor constants, the fixed input size and patch grid the vision graph was
built for, the special token ids, the decoder's KV-cache layout and the graphs' tensor names.
The functions here are numpy ports of the parts of transformers the runtime cannot import:
patchification (`Qwen2VLImageProcessor.patchify`), the chat-prompt layout with image-pad
expansion, and the 3-D M-RoPE position ids (`get_rope_index`). Each is parity-tested against
transformers by the exporter (and tests/test_export_vlm*.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rau_rt.errors import BundleError, InputError
from rau_rt.ops.preprocessing import smart_resize
from rau_rt.sidecar import read_json, write_json

LAYOUT_FILE = "vlm.json"
LAYOUT_VERSION = 1
# Graph roles in the bundle manifest.
VISION, EMBED, DECODER = "vlm_vision", "vlm_embed", "vlm_decoder"


@dataclass(frozen=True)
class VlmFamily:
    """The constants one Qwen-VL generation differs in (the one adapter the exporter keys on).

    Attributes:
        name: transformers `model_type` ("qwen2_5_vl", "qwen2_vl", "qwen3_vl").
        architecture: the `architectures[0]` of a fine-tune's config.json.
        patch_size: vision patch side in pixels (14; Qwen3-VL 16).
        merge_size: patches merged per visual token side (2), so a token covers
            patch_size * merge_size pixels (28; Qwen3-VL 32) and sizes are multiples of it.
        temporal_patch_size: frames per patch (2); a still image is repeated to fill it.
        mean, std: normalization after scaling to [0, 1] (OpenAI CLIP's; Qwen3-VL 0.5/0.5).
        box_convention: "absolute" (pixels of the resized input, Qwen2.5-VL) or "relative_1000"
            (0-1000 of the input, Qwen2-VL / Qwen3-VL); rau_rt.geometry converts either.
        default_system: the system prompt the family's chat template inserts when a
            conversation has none (Qwen2-VL/2.5-VL: "You are a helpful assistant."; Qwen3-VL's
            template inserts none).
        deepstack: the vision tower also emits features of intermediate blocks that the
            decoder adds at image-token positions after its first layers (Qwen3-VL).
    """

    name: str
    architecture: str
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    box_convention: str
    default_system: str | None
    deepstack: bool = False

    @property
    def factor(self) -> int:
        """Pixels per visual-token side: input sides must be multiples of it."""
        return self.patch_size * self.merge_size


DEFAULT_SYSTEM = "You are a helpful assistant."
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FAMILIES: dict[str, VlmFamily] = {
    "qwen2_5_vl": VlmFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", 14, 2, 2,
                            _CLIP_MEAN, _CLIP_STD, "absolute", DEFAULT_SYSTEM),
    "qwen2_vl": VlmFamily("qwen2_vl", "Qwen2VLForConditionalGeneration", 14, 2, 2,
                          _CLIP_MEAN, _CLIP_STD, "relative_1000", DEFAULT_SYSTEM),
    # Qwen3-VL's preprocessor_config.json: patch 16, merge 2, mean = std = 0.5 (SigLIP-2's)
    "qwen3_vl": VlmFamily("qwen3_vl", "Qwen3VLForConditionalGeneration", 16, 2, 2,
                          (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "relative_1000", None,
                          deepstack=True),
}

# Qwen's chat format; `<|image_pad|>` is expanded to the image's token count after tokenizing.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
# Frame shapes a bundle can keep the aspect of, as (height, width) ratios: square, 4:3 and
# 16:9 landscape, and their portrait transposes (`aspect_sizes`).
ASPECTS = ((1, 1), (3, 4), (4, 3), (9, 16), (16, 9))


def aspect_sizes(pixels: int, factor: int) -> tuple[tuple[int, int], ...]:
    """The model-input (height, width) of each of `ASPECTS` at a pixel budget: what Qwen's
    image processor (`smart_resize` with max_pixels = `pixels`) makes of a large frame of that
    aspect, e.g. 168x252 for a 900x1200 frame and 168x280 for 1080x1920 at 224x224 pixels."""
    scale = 1 << 12  # a frame large enough to be scaled down to the budget, as a camera's is
    return tuple(smart_resize(h * scale // max(h, w), w * scale // max(h, w), factor=factor,
                              min_pixels=factor * factor, max_pixels=pixels)
                 for h, w in ASPECTS)


@dataclass(frozen=True)
class VlmLayout:
    """`vlm.json`: the contract between an exported VLM bundle and the runtime's decode loop.

    Graphs (roles in manifest.json; B batch, S new tokens, P past tokens, N image tokens):
        vlm_vision: pixel_values [grid_h*grid_w, patch_dim] float -> image_features
            [tokens_per_image, hidden] (one image at `input_size`; `patchify` makes the input).
        vlm_embed: input_ids [B, S] int64, image_features [N, hidden] -> inputs_embeds
            [B, S, hidden] (image features scattered, in order, at `image_token_id` positions;
            N may be 0).
        vlm_decoder: inputs_embeds [B, S, hidden], attention_mask [B, P+S] int64 (1 = attend),
            position_ids [3, B, S] int64 (`rope_positions`), past_key_values.{i}.key/.value
            [B, num_kv_heads, P, head_dim] -> logits [B, vocab] (last position),
            present.{i}.key/.value [B, num_kv_heads, P+S, head_dim] (past + new, fed back as
            the next step's past), and last_hidden_state [B, S, hidden] when
            `has_hidden_state`.
        Deepstack (Qwen3-VL, `deepstack_layers` L > 0): vlm_vision also outputs
            deepstack_features [L, tokens_per_image, hidden] (its intermediate blocks' merged
            features); vlm_embed also takes deepstack_features [L, N, hidden] and outputs
            deepstack_embeds [L, B, S, hidden]: the rows scattered like image_features, zeros
            at every other position; vlm_decoder also takes deepstack_embeds and adds row l to
            its hidden states after layer l. Adding zeros elsewhere is transformers' masked add
            exactly, with static shapes; decode steps and text-only prefills feed zeros.
        Float tensors take the dtype each graph declares (fp16 graphs: the KV cache is
            float16, other inputs and outputs float32); the runtime casts with `cast_feeds`.
    """

    family: str
    input_size: tuple[int, int]  # (height, width) every image is resized to
    grid_thw: tuple[int, int, int]  # patch grid of one image
    patch_dim: int  # channels * temporal_patch_size * patch_size**2
    tokens_per_image: int
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    mrope_section: tuple[int, ...]
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    has_hidden_state: bool
    float_dtype: str = "float32"
    deepstack_layers: int = 0
    past_names: tuple[str, ...] = field(default=())  # per layer: key, value
    present_names: tuple[str, ...] = field(default=())
    # Other input sizes with a vision graph each (aspect buckets, `aspect_sizes`); a frame
    # goes to the size of nearest aspect (`size_for`). Empty: every image at `input_size`.
    buckets: tuple[tuple[int, int], ...] = field(default=())
    version: int = LAYOUT_VERSION

    @property
    def family_constants(self) -> VlmFamily:
        return family(self.family)

    def vision_graph(self, size: Sequence[int]) -> str:
        """The vision graph's role for a model input of (height, width) `size`: `VISION` at
        `input_size`, `vlm_vision_<h>x<w>` for a bucket."""
        size = (int(size[0]), int(size[1]))
        if size == tuple(self.input_size):
            return VISION
        if size not in self.sizes:
            raise InputError(f"no vision graph for a {size[0]}x{size[1]} input: the bundle has "
                             f"{['x'.join(map(str, s)) for s in self.sizes]}")
        return f"{VISION}_{size[0]}x{size[1]}"

    @property
    def vision_graphs(self) -> tuple[str, ...]:
        """Every vision graph's role, `input_size`'s first."""
        return tuple(self.vision_graph(s) for s in self.sizes)

    def merged_grid(self, size: Sequence[int]) -> tuple[int, int]:
        """(rows, cols) of an image's visual tokens at model-input `size`."""
        m = self.family_constants.merge_size
        _, gh, gw = self.grid_for(size)
        return gh // m, gw // m

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """Every model-input (height, width) the bundle takes: `input_size`, then buckets."""
        return tuple(dict.fromkeys([tuple(self.input_size), *(tuple(b) for b in self.buckets)]))

    def size_for(self, frame_size: Sequence[int]) -> tuple[int, int]:
        """The model-input size a frame of (height, width) is resized to: the size whose
        aspect is nearest the frame's (in log ratio; the first on a tie)."""
        height, width = int(frame_size[0]), int(frame_size[1])
        if height < 1 or width < 1:
            raise InputError(f"size_for: expected a positive frame size, got {frame_size}")
        aspect = np.log(height / width)
        return min(self.sizes, key=lambda s: abs(np.log(s[0] / s[1]) - aspect))

    def grid_for(self, size: Sequence[int]) -> tuple[int, int, int]:
        """The patch grid (t, h, w) of a model input of (height, width) `size`."""
        p = self.family_constants.patch_size
        return (1, int(size[0]) // p, int(size[1]) // p)

    def tokens_for(self, size: Sequence[int]) -> int:
        """Image tokens of a model input of (height, width) `size`."""
        m = self.family_constants.merge_size
        _, gh, gw = self.grid_for(size)
        return (gh // m) * (gw // m)

    def kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        """Shape of one layer's key (or value) cache holding `length` tokens."""
        return (batch, self.num_kv_heads, length, self.head_dim)

    def empty_past(self, batch: int = 1, dtype: str | None = None) -> dict[str, np.ndarray]:
        """Zero-length past for a prefill from scratch (in the decoder's KV `dtype`)."""
        shape = self.kv_shape(batch, 0)
        return {name: np.zeros(shape, dtype or self.float_dtype) for name in self.past_names}

    def no_deepstack(self, batch: int, length: int) -> dict[str, np.ndarray]:
        """The decoder's deepstack feed for tokens without images (empty without deepstack)."""
        if not self.deepstack_layers:
            return {}
        shape = (self.deepstack_layers, batch, length, self.hidden_size)
        return {"deepstack_embeds": np.zeros(shape, self.float_dtype)}

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> VlmLayout:
        if data.get("version") != LAYOUT_VERSION:
            raise BundleError(f"{LAYOUT_FILE}: version {data.get('version')!r}, this rau-rt "
                              f"reads {LAYOUT_VERSION}; re-export with `rau-rt export vlm`")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        values["buckets"] = tuple(tuple(b) for b in values.get("buckets", ()))
        return cls(**values)


def cast_feeds(feeds: Mapping[str, np.ndarray],
               dtypes: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Floating feeds cast to the dtype their graph declares (`dtypes`: input name -> numpy
    dtype name, e.g. from the bundle entry's input specs); other feeds unchanged."""
    out = {}
    for name, value in feeds.items():
        want = dtypes.get(name)
        if want is not None and value.dtype.kind == "f" and value.dtype != np.dtype(want):
            value = value.astype(want)
        out[name] = value
    return out


def declared_dtypes(graphs: object, graph: str) -> dict[str, str]:
    """Input name -> dtype of `graph` as loaded in `graphs` (a `rau_rt.bundle.Bundle`: its
    entry's input specs); {} for runners without entries (test doubles, benchmark wrappers),
    whose feeds then pass uncast."""
    entry = getattr(graphs, "entry", None)
    if entry is None:
        return {}
    return {spec.name: spec.dtype for spec in entry(graph).inputs}


def family(name: str) -> VlmFamily:
    """The family adapter for a transformers `model_type`."""
    if name not in FAMILIES:
        raise InputError(f"VLM family {name!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def write_layout(directory: str | Path, layout: VlmLayout) -> Path:
    """Write `vlm.json` into a bundle directory."""
    return write_json(Path(directory) / LAYOUT_FILE, layout.to_dict())


def read_layout(directory: str | Path) -> VlmLayout:
    """Read a bundle's `vlm.json`."""
    path = Path(directory) / LAYOUT_FILE
    data = read_json(path, "export the VLM with `rau-rt export vlm --model DIR --out BUNDLE`")
    try:
        return VlmLayout.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: malformed ({exc!r}); re-export the VLM bundle") from None


def patchify(pixels: np.ndarray, fam: VlmFamily) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalized CHW image -> (vision-graph patches [grid_h*grid_w, patch_dim], grid_thw).

    `pixels` is `rau_rt.ops.resize_for_vlm(..., size=layout.input_size, mean=fam.mean,
    std=fam.std).pixels` (RGB, float32). Patches are ordered merge-window by merge-window
    (rows of windows, then the merge_size**2 patches inside), each flattened as (channel,
    temporal, y, x); a still image fills the temporal axis by repetition, as transformers does.
    """
    if pixels.ndim == 4 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 3:
        raise InputError(f"patchify: expected a CHW image, got shape {pixels.shape}")
    channels, height, width = pixels.shape
    p, m, t = fam.patch_size, fam.merge_size, fam.temporal_patch_size
    if height % fam.factor or width % fam.factor:
        raise InputError(f"patchify: image {height}x{width} is not a multiple of {fam.factor} "
                         "(patch x merge); resize with rau_rt.ops.resize_for_vlm first")
    grid_h, grid_w = height // p, width // p
    patches = pixels.astype(np.float32, copy=False).reshape(
        channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, py, px)
    patches = np.broadcast_to(patches[:, :, :, :, :, None],
                              (*patches.shape[:5], t, p, p))
    return (np.ascontiguousarray(patches).reshape(grid_h * grid_w, channels * t * p * p),
            (1, grid_h, grid_w))


def chat_prompt(user_parts: Sequence[str], system: str | None = DEFAULT_SYSTEM) -> str:
    """Qwen chat text of one user turn plus the assistant header (the generation prompt).

    `user_parts` are concatenated; use `IMAGE_PLACEHOLDER` for each image, e.g.
    [IMAGE_PLACEHOLDER, "Reference. ", IMAGE_PLACEHOLDER, "Target. Find the LAD."].
    Matches the Qwen2-VL/2.5-VL chat template with add_generation_prompt=True.
    """
    head = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    return f"{head}{IM_START}user\n{''.join(user_parts)}{IM_END}\n{IM_START}assistant\n"


def expand_image_tokens(ids: Sequence[int], layout: VlmLayout,
                        sizes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Token ids with each single image-pad token repeated as many times as its image has
    tokens: `tokens_per_image`, or per image in order from its model-input `sizes`."""
    ids = np.asarray(ids, dtype=np.int64)
    pads = ids == layout.image_token_id
    if sizes is None:
        counts = np.where(pads, layout.tokens_per_image, 1)
    else:
        if int(pads.sum()) != len(sizes):
            raise InputError(f"expand_image_tokens: {int(pads.sum())} images in the text, "
                             f"{len(sizes)} sizes given")
        counts = np.ones(len(ids), np.int64)
        counts[pads] = [layout.tokens_per_image if tuple(s) == tuple(layout.input_size)
                        else layout.tokens_for(s) for s in sizes]
    return np.repeat(ids, counts)


def rope_positions(input_ids: np.ndarray, layout: VlmLayout, start: int = 0,
                   grids: Sequence[Sequence[int]] | None = None,
                   ) -> tuple[np.ndarray, int]:
    """3-D M-RoPE position ids [3, B, S] and the rope delta for decoding after them.

    A numpy port of transformers' `get_rope_index` for still images: text tokens advance all
    three axes by one; an image's tokens take (t, h, w) = (p, p + row, p + col) over its
    merged grid, p being the position before it, and the next text continues at
    p + max(rows, cols). Decode steps then use position `past_length + delta` on every axis.

    Args:
        input_ids: [B, S] ids of a full prompt (every image's pad tokens expanded).
        layout: the bundle's layout (grid, merge size, image token id).
        start: position of the first token (0 for a prompt from scratch).
        grids: each image's merged (rows, cols) in order (`layout.merged_grid`); None: every
            image at the layout's input size.

    Returns:
        (position_ids [3, B, S] int64, delta = max position + 1 - (start + S)), with the same
        delta for every row (rows must share the image layout).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise InputError(f"rope_positions: expected [batch, seq] ids, got shape {ids.shape}")
    default = layout.merged_grid(layout.input_size)
    out = np.zeros((3, *ids.shape), np.int64)
    deltas = set()
    for b, row in enumerate(ids):
        pos, i, length, image = start, 0, len(row), 0
        while i < length:
            if row[i] == layout.image_token_id:
                if grids is not None and image >= len(grids):
                    raise InputError(f"rope_positions: more images in the ids than the "
                                     f"{len(grids)} grids given")
                rows, cols = default if grids is None else (int(v) for v in grids[image])
                per_image = rows * cols
                if i + per_image > length or np.any(row[i:i + per_image]
                                                    != layout.image_token_id):
                    raise InputError(f"rope_positions: an image needs {per_image} consecutive "
                                     "image-pad tokens; expand them with expand_image_tokens")
                out[0, b, i:i + per_image] = pos
                out[1, b, i:i + per_image] = pos + np.repeat(np.arange(rows), cols)
                out[2, b, i:i + per_image] = pos + np.tile(np.arange(cols), rows)
                pos += max(rows, cols)
                i += per_image
                image += 1
            else:
                out[:, b, i] = pos
                pos += 1
                i += 1
        if grids is not None and image != len(grids):
            raise InputError(f"rope_positions: {image} images in the ids, {len(grids)} grids "
                             "given")
        deltas.add(int(out[:, b].max()) + 1 - (start + length) if length else 0)
    if len(deltas) > 1:
        raise InputError("rope_positions: rows have different image layouts; run them apart")
    return out, deltas.pop() if deltas else 0


def decode_positions(past_length: int, delta: int, batch: int = 1, steps: int = 1) -> np.ndarray:
    """Position ids [3, B, steps] of tokens appended after `past_length` cached tokens."""
    positions = np.arange(past_length, past_length + steps, dtype=np.int64) + delta
    return np.broadcast_to(positions, (3, batch, steps)).copy()
