"""The four graphs of SAM2's video path as `nn.Module`s over sam2's own submodules.

Each wrapper is what one engine runs per frame; together they compute what
`SAM2VideoPredictor` does per frame (notes/sam2_parity.md, section 2), with the selection
between mask tokens (argmax IoU, stability fallback) left to the runtime because it depends on
the prompt, not on tensors. The batch dimension is regions (N): one call serves every tracked
region of a frame, and the frame's own tensors (features, high-res maps) enter once with batch 1.

Graph contract (S = image size, D = hidden dim, M = memory dim, h = w = S/16; float32 unless
said; N = regions, dynamic 1..MAX_REGIONS; P = points, dynamic 1..MAX_POINTS):

image_encoder
    in  image [1,3,S,S] (ImageNet-normalized RGB, `ops.preprocess`)
    out high_res_0 [1,D/8,S/4,S/4], high_res_1 [1,D/4,S/8,S/8] (after the decoder's conv_s0/s1),
        vision_features [1,D,h,w] (raw: memory encoder input), vision_pos [1,D,h,w] (constant),
        features_no_memory [1,D,h,w] = vision_features + no_mem_embed (a frame with no memory:
        the first prompted frame; sam2 skips memory attention there)
mask_decoder
    in  image_embed [N,D,h,w] (conditioned_features, or features_no_memory broadcast),
        high_res_0 [1,..], high_res_1 [1,..], point_coords [N,P,2] (x, y in S-pixel units),
        point_labels [N,P] int32 (1 fg, 0 bg, 2/3 box corners, -1 padding), mask_input
        [N,1,S/4,S/4] logits, has_mask_input [N] bool (False: the learned no-mask embedding)
    out masks [N,4,S/4,S/4] logits of all 4 tokens (-1024 where the object is absent),
        iou [N,4], object_pointers [N,4,D] (no_obj_ptr where absent), object_score [N,1]
    A box is 2 points labelled 2, 3; a tracked frame is 1 point (0, 0) labelled -1 (sam2 pads
    one more point itself, as here). P changes the token count, so padding P is not neutral.
memory_attention (compacted, as sam2 gathers it; K memories 1..MAX_SLOTS, Q pointers
1..MAX_POINTERS, dynamic)
    in  current_features [1,D,h,w], current_pos [1,D,h,w], memory [N,K,M,h,w], memory_pos
        [N,K,M,h,w] (memory encoder's spatial encoding, without time), memory_tpos_index [N,K]
        int64 (row of maskmem_tpos_enc: 6 for a conditioning frame, k-1 for frame t-k),
        object_pointers [N,Q,D], pointer_position [N,Q] (signed frame offset t - t_ptr divided
        by t_diff_max = min(clip frames, 16) - 1)
    out conditioned_features [N,D,h,w]
    Regions batched in one call share K and Q (the tracker groups them). No padding: masked
    slots would cost their full attention and keep ONNX Runtime off its fused kernel.
memory_encoder
    in  vision_features [1,D,h,w], masks [N,1,S/4,S/4] (selected low-res logits), object_score
        [N,1], binarize [N] bool (True for a mask from prompts: sam2 binarizes those)
    out memory [N,M,h,w] (no-object embedding added where absent), memory_pos [N,M,h,w]
memory_attention_pooled
    memory_attention's inputs and outputs; each memory's keys and values are averaged over
    MEMORY_POOL x MEMORY_POOL blocks after RoPE (the tracker's `memory_pool` lever: a faster
    approximation, verified against the same pooling in eager torch, not against sam2)
memory_attention_window
    in  memory_attention's inputs, and window_index [N,W*W] int64: each region's square window
        of the h x w grid (row-major token indices, W = h / MEMORY_WINDOW)
    out conditioned_window [N,D,W,W]: the window's tokens conditioned on the region's memory;
        their self-attention sees only the window (the tracker's `memory_window` lever: a
        faster approximation, verified against the same windowing in eager torch)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rau_rt.config import DEFAULT_ENGINE_CONFIG, EngineConfig
from rau_rt.engines.torch import NUMPY_FLOAT, TorchEagerEngine
from rau_rt.errors import InputError
from rau_rt.export.sam2.model import RealMemoryAttention, feature_side
from rau_rt.sam2_layout import (
    MAX_POINTERS,
    MAX_SLOTS,
    MEMORY_POOL,
    MEMORY_WINDOW,
    POOLED_MEMORY_ATTENTION,
    RECENT_POINTERS,
    RECENT_SLOTS,
    WINDOWED_MEMORY_ATTENTION,
    Sam2Layout,
    window_side,
)
from rau_rt.types import TensorSpec

# sam2's NO_OBJ_SCORE: the logit of every pixel of an absent object.
NO_OBJECT_LOGIT = -1024.0
MAX_POINTS = 16

GRAPH_NAMES = ("image_encoder", "mask_decoder", "memory_attention", "memory_encoder",
               POOLED_MEMORY_ATTENTION, WINDOWED_MEMORY_ATTENTION)
OUTPUTS = {
    "image_encoder": ("high_res_0", "high_res_1", "vision_features", "vision_pos",
                      "features_no_memory"),
    "mask_decoder": ("masks", "iou", "object_pointers", "object_score"),
    "memory_attention": ("conditioned_features",),
    "memory_encoder": ("memory", "memory_pos"),
    POOLED_MEMORY_ATTENTION: ("conditioned_features",),
    WINDOWED_MEMORY_ATTENTION: ("conditioned_window",),
}

# What manifest.json records per graph (the module docstring has the full contract).
CONTRACT = {
    "image_encoder": "image [1,3,S,S] ImageNet-normalized RGB -> high_res_0/1 (decoder "
                     "high-res maps), vision_features (raw, memory encoder input), vision_pos, "
                     "features_no_memory (+ no_mem_embed: decoder input on a frame without memory)",
    "mask_decoder": "batch = regions N. image_embed [N,D,h,w]; high_res_0/1 batch 1; point_coords "
                    "[N,P,2] in S pixels, point_labels [N,P] int32 (box: 2 points labelled 2,3; "
                    "tracking: 1 point labelled -1); mask_input [N,1,S/4,S/4] used where "
                    "has_mask_input [N]. Outputs all 4 tokens: masks (-1024 where absent), iou, "
                    "object_pointers (no_obj_ptr where absent), object_score. The runtime picks "
                    "the token: multimask (<=1 point) argmax iou[1:]; else token 0 unless its "
                    "stability < 0.98, pointer token 0",
    "memory_attention": f"compacted memory as sam2 gathers it. memory/memory_pos [N,K,M,h,w] "
                        f"with K in 1..{MAX_SLOTS}, memory_tpos_index [N,K] int64 (6: "
                        "conditioning frame, k-1: frame t-k); object_pointers [N,Q,D] with Q in "
                        f"1..{MAX_POINTERS}, pointer_position [N,Q] = (t - t_ptr) / "
                        "(min(frames,16) - 1). Regions in one call share K and Q",
    "memory_encoder": "vision_features [1,D,h,w]; masks [N,1,S/4,S/4] selected logits; "
                      "object_score [N,1]; binarize [N] bool (True for masks from prompts). "
                      "-> memory [N,M,h,w] (+ no-object embedding where absent), memory_pos",
    POOLED_MEMORY_ATTENTION: f"memory_attention's inputs and outputs; its cross-attention "
                             f"averages each memory's keys and values (after RoPE) over "
                             f"{MEMORY_POOL}x{MEMORY_POOL} blocks: fewer keys, not sam2's "
                             "result (the tracker's memory_pool lever)",
    WINDOWED_MEMORY_ATTENTION: f"memory_attention's inputs plus window_index [N,W*W] int64 "
                               f"(each region's square of the grid, row-major, W = side/"
                               f"{MEMORY_WINDOW}) -> conditioned_window [N,D,W,W]; the "
                               "window's self-attention sees only the window: not sam2's "
                               "result (the tracker's memory_window lever)",
}


def check_supported(model: nn.Module) -> None:
    """Raise for sam2 options these graphs do not implement (every sam2.1 config passes)."""
    needed = {"use_high_res_features_in_sam": True, "pred_obj_scores": True,
              "use_obj_ptrs_in_encoder": True, "add_tpos_enc_to_obj_ptrs": True,
              "proj_tpos_enc_in_obj_ptrs": True, "directly_add_no_mem_embed": True,
              "num_maskmem": RECENT_SLOTS + 1, "max_obj_ptrs_in_encoder": RECENT_POINTERS + 1}
    wrong = {k: getattr(model, k, None) for k, v in needed.items() if getattr(model, k, None) != v}
    if wrong:
        raise InputError(f"this SAM2 config sets {wrong}; the exported graphs implement the "
                         f"sam2.1 video settings {needed}")


class ImageEncoder(nn.Module):
    """Hiera + FPN neck, the decoder's high-res projections, and the no-memory features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        out = self.model.forward_image(image)
        fpn, pos = out["backbone_fpn"], out["vision_pos_enc"]
        features = fpn[-1]
        no_memory = features + self.model.no_mem_embed.reshape(1, -1, 1, 1)
        return fpn[0], fpn[1], features, pos[-1], no_memory


class MaskDecoder(nn.Module):
    """Prompt encoder + mask decoder + object-pointer head for N regions, all 4 mask tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embed, high_res_0, high_res_1, point_coords, point_labels,
                mask_input, has_mask_input):
        model = self.model
        prompt = model.sam_prompt_encoder
        regions = image_embed.shape[0]
        sparse, no_mask = prompt(points=(point_coords, point_labels), boxes=None, masks=None)
        dense = torch.where(has_mask_input[:, None, None, None],
                            prompt.mask_downscaling(mask_input), no_mask)
        masks, iou, tokens, score = model.sam_mask_decoder.predict_masks(
            image_embeddings=image_embed, image_pe=prompt.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            repeat_image=False,
            high_res_features=[high_res_0.expand(regions, -1, -1, -1),
                               high_res_1.expand(regions, -1, -1, -1)])
        present = score > 0
        masks = torch.where(present[:, :, None, None], masks, NO_OBJECT_LOGIT)
        pointers = model.obj_ptr_proj(tokens)
        weight = (score.sigmoid() if model.soft_no_obj_ptr else present.float())[:, :, None]
        if model.fixed_no_obj_ptr:
            pointers = weight * pointers
        pointers = pointers + (1 - weight) * model.no_obj_ptr
        return masks, iou, pointers, score


class MemoryAttention(nn.Module):
    """Current features attend to K spatial memories and Q object pointers per region
    (`pool` > 1: to the memories' keys pooled over pool x pool blocks, `RealMemoryAttention`)."""

    def __init__(self, model: nn.Module, pool: int = 1) -> None:
        super().__init__()
        self.model = model
        self.attention = RealMemoryAttention(model.memory_attention, feature_side(model), pool)


    def forward(self, current_features, current_pos, memory, memory_pos, memory_tpos_index,
                object_pointers, pointer_position):
        regions, hidden, height, width = (memory.shape[0], *current_features.shape[1:])
        # batch 1: the attention shares the first self-attention among the regions
        out = self.attention(*self.tokens(current_features, current_pos, memory, memory_pos,
                                          memory_tpos_index, object_pointers,
                                          pointer_position))
        return out.transpose(1, 2).reshape(regions, hidden, height, width)

    def tokens(self, current_features, current_pos, memory, memory_pos, memory_tpos_index,
               object_pointers, pointer_position) -> tuple:
        """The graph inputs as `RealMemoryAttention` takes them: (current tokens, their
        positions, memory tokens, their positions, the pointer token count)."""
        from sam2.modeling.sam2_utils import get_1d_sine_pe

        model = self.model
        regions, slots, mem_dim, height, width = memory.shape
        hidden = current_features.shape[1]
        tokens = height * width
        curr = current_features.flatten(2).transpose(1, 2)
        curr_pos = current_pos.flatten(2).transpose(1, 2)
        spatial = memory.permute(0, 1, 3, 4, 2).reshape(regions, slots * tokens, mem_dim)
        tpos = model.maskmem_tpos_enc.reshape(-1, mem_dim)[memory_tpos_index]
        spatial_pos = (memory_pos.permute(0, 1, 3, 4, 2).reshape(regions, slots, tokens, mem_dim)
                       + tpos[:, :, None, :]).reshape(regions, slots * tokens, mem_dim)
        # A D-dim pointer becomes D/M tokens of width M (4 for every sam2.1 config), in sam2's
        # order: pointer-major, then split index.
        split = hidden // mem_dim
        pointers = object_pointers.reshape(regions, -1, mem_dim)
        pointer_pos = model.obj_ptr_tpos_proj(get_1d_sine_pe(pointer_position, dim=hidden))
        pointer_pos = pointer_pos.repeat_interleave(split, dim=1)
        return (curr, curr_pos, torch.cat((spatial, pointers), dim=1),
                torch.cat((spatial_pos, pointer_pos), dim=1), pointers.shape[1])


class PooledMemoryAttention(MemoryAttention):
    """The `memory_attention_pooled` graph: MemoryAttention with MEMORY_POOL."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, MEMORY_POOL)


class WindowedMemoryAttention(MemoryAttention):
    """The `memory_attention_window` graph: MemoryAttention for each region's window only."""

    def forward(self, current_features, current_pos, memory, memory_pos, memory_tpos_index,
                object_pointers, pointer_position, window_index):
        regions, hidden = memory.shape[0], current_features.shape[1]
        side = window_side(current_features.shape[-1])
        out = self.attention(*self.tokens(current_features, current_pos, memory, memory_pos,
                                          memory_tpos_index, object_pointers,
                                          pointer_position), window=window_index)
        return out.transpose(1, 2).reshape(regions, hidden, side, side)


class MemoryEncoder(nn.Module):
    """Mask (upsampled, binarized or sigmoid x20-10) + raw features -> one memory per region."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, vision_features, masks, object_score, binarize):
        model = self.model
        regions = masks.shape[0]
        size = model.image_size
        high = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        if model.binarize_mask_from_pts_for_mem_enc:
            mask = torch.where(binarize[:, None, None, None], (high > 0).float(), high.sigmoid())
        else:
            mask = high.sigmoid()
        mask = mask * model.sigmoid_scale_for_mem_enc + model.sigmoid_bias_for_mem_enc
        out = model.memory_encoder(vision_features.expand(regions, -1, -1, -1), mask,
                                   skip_mask_sigmoid=True)
        features, pos = out["vision_features"], out["vision_pos_enc"][-1]
        if model.no_obj_embed_spatial is not None:
            absent = 1 - (object_score > 0).float()
            features = features + absent[:, :, None, None] * model.no_obj_embed_spatial[
                ..., None, None]
        return features, pos


WRAPPERS = {"image_encoder": ImageEncoder, "mask_decoder": MaskDecoder,
            "memory_attention": MemoryAttention, "memory_encoder": MemoryEncoder,
            POOLED_MEMORY_ATTENTION: PooledMemoryAttention,
            WINDOWED_MEMORY_ATTENTION: WindowedMemoryAttention}


def graph_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The four wrappers around one model (sharing its weights), in eval mode."""
    check_supported(model)
    return {name: cls(model).eval() for name, cls in WRAPPERS.items()}


def layout(model: nn.Module) -> Sam2Layout:
    """The bundle's `sam2.json` for `model` (the settings the runtime's token selection needs)."""
    decoder = model.sam_mask_decoder
    conv = model.mask_downsample
    if tuple(conv.kernel_size) != (4, 4) or tuple(conv.stride) != (4, 4):
        raise InputError(f"mask_downsample is a {tuple(conv.kernel_size)} conv with stride "
                         f"{tuple(conv.stride)}; sam2.json stores sam2.1's 4x4 stride-4 one")
    return Sam2Layout(
        image_size=int(model.image_size), hidden_dim=int(model.hidden_dim),
        memory_dim=int(model.mem_dim),
        fill_hole_area=int(getattr(model, "fill_hole_area", 0)),
        multimask_stability=bool(decoder.dynamic_multimask_via_stability),
        stability_delta=float(decoder.dynamic_multimask_stability_delta),
        stability_threshold=float(decoder.dynamic_multimask_stability_thresh),
        mask_downsample_weight=tuple(float(v) for v in conv.weight.detach().flatten()),
        mask_downsample_bias=float(conv.bias.detach()[0]))


def graph_specs(model: nn.Module, float_dtype: str = "float32",
                ) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """(inputs, outputs) per graph, from the contract above; what an export records."""
    s, d, m = int(model.image_size), int(model.hidden_dim), int(model.mem_dim)
    low, side, n, k, q = s // 4, s // 16, "regions", "memory_slots", "pointer_slots"

    def f(name, *shape):
        return TensorSpec(name, shape, float_dtype)

    def frame(name, channels, size):
        return f(name, 1, channels, size, size)

    specs = {
        "image_encoder": (
            (f("image", 1, 3, s, s),),
            (frame("high_res_0", d // 8, low), frame("high_res_1", d // 4, s // 8),
             frame("vision_features", d, side), frame("vision_pos", d, side),
             frame("features_no_memory", d, side))),
        "mask_decoder": (
            (f("image_embed", n, d, side, side), frame("high_res_0", d // 8, low),
             frame("high_res_1", d // 4, s // 8), f("point_coords", n, "points", 2),
             TensorSpec("point_labels", (n, "points"), "int32"), f("mask_input", n, 1, low, low),
             TensorSpec("has_mask_input", (n,), "bool")),
            (f("masks", n, 4, low, low), f("iou", n, 4), f("object_pointers", n, 4, d),
             f("object_score", n, 1))),
        "memory_attention": (
            (frame("current_features", d, side), frame("current_pos", d, side),
             f("memory", n, k, m, side, side), f("memory_pos", n, k, m, side, side),
             TensorSpec("memory_tpos_index", (n, k), "int64"),
             f("object_pointers", n, q, d), f("pointer_position", n, q)),
            (f("conditioned_features", n, d, side, side),)),
        "memory_encoder": (
            (frame("vision_features", d, side), f("masks", n, 1, low, low),
             f("object_score", n, 1), TensorSpec("binarize", (n,), "bool")),
            (f("memory", n, m, side, side), f("memory_pos", n, m, side, side))),
    }
    specs[POOLED_MEMORY_ATTENTION] = specs["memory_attention"]
    window = window_side(side)
    specs[WINDOWED_MEMORY_ATTENTION] = (
        (*specs["memory_attention"][0],
         TensorSpec("window_index", (n, window * window), "int64")),
        (f("conditioned_window", n, d, window, window),))
    return specs


class EagerGraphs:
    """The four graphs as eager torch engines over one model: the reference the tracker's
    bundle is checked against, and the torch (CUDA) backend for GPU measurements.

    Same interface the Tracker uses on a loaded `Bundle`: `engines`, `run(graph, feeds)`,
    `close()`. `config.precision` fp16/bf16 runs the graphs under `torch.autocast` with fp32
    weights (`TorchEagerEngine.from_module(autocast=True)`): sam2's code casts to fp32 in
    places (point encodings, presence masks), so a model cast to fp16 does not run.
    """

    def __init__(self, model: nn.Module, config: EngineConfig = DEFAULT_ENGINE_CONFIG) -> None:
        precision = config.precision or "fp32"
        specs = graph_specs(model, NUMPY_FLOAT.get(precision, "float32"))
        modules = graph_modules(model)
        self._engines = {name: TorchEagerEngine.from_module(modules[name], *specs[name], config,
                                                            autocast=True)
                         for name in GRAPH_NAMES}
        self.layout = layout(model)

    @property
    def engines(self) -> dict[str, TorchEagerEngine]:
        return dict(self._engines)

    def run(self, graph: str, feeds):
        return self._engines[graph].run(feeds)

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
