"""Build or load the SAM2 model the exporter turns into graphs, and the real-valued RoPE rewrite.

Every model comes from the `sam2` 1.1.0 classes through `build_sam2_video_predictor`, the path a
user of sam2's video predictor takes: Meta's configs with a checkpoint from a path, the same
configs with random weights (`tiny`, `small`), or `micro`, a deliberately small SAM2 (Hiera with
16 channels, 1 memory-attention layer) made of the same classes by config overrides, so unit
tests export all four graphs in seconds (`mini` widens micro's trunk for the demo weights).
The override sets follow the measured recipe in notes/sam2_parity.md (keys that must change
together).

`RealRoPEAttention` replaces sam2's `RoPEAttention` for export: the same projections and the
same rotation, written with cos/sin tables instead of `view_as_complex` (which neither ONNX
exporter handles: sam2 #186), plus an optional key-validity mask for fixed memory slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rau_rt.errors import InputError

# Meta's config files, by the names the CLI accepts.
CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
RANDOM_INIT = ("micro", "mini", "tiny", "small")
SMALL_CONFIGS = ("micro", "mini")  # tiny's config with overrides; the only ones at 256 px
IMAGE_SIZES = (256, 512, 1024)
# micro: hidden 128 / memory 32 keeps sam2's "pointer split into D/M = 4 tokens" path of hiera-t
# (256/64); Hiera 16 channels with stages [1,1,2,1]; the global block (3) is not a stage's first
# block (hieradet divides by window // q_stride = 0 there). 2.6 M parameters, ~20 ms/frame eager.
MICRO_HIDDEN, MICRO_MEMORY = 128, 32
MICRO_OVERRIDES = (
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.dim_feedforward=256",
    "++model.memory_encoder.fuser.num_layers=1",
    f"++model.image_encoder.neck.d_model={MICRO_HIDDEN}",
    f"++model.image_encoder.neck.position_encoding.num_pos_feats={MICRO_HIDDEN}",
    f"++model.memory_attention.d_model={MICRO_HIDDEN}",
    f"++model.memory_attention.layer.d_model={MICRO_HIDDEN}",
    f"++model.memory_attention.layer.self_attention.embedding_dim={MICRO_HIDDEN}",
    f"++model.memory_attention.layer.cross_attention.embedding_dim={MICRO_HIDDEN}",
    f"++model.memory_attention.layer.cross_attention.kv_in_dim={MICRO_MEMORY}",
    f"++model.memory_encoder.in_dim={MICRO_HIDDEN}",
    f"++model.memory_encoder.out_dim={MICRO_MEMORY}",
    f"++model.memory_encoder.position_encoding.num_pos_feats={MICRO_MEMORY}",
    f"++model.memory_encoder.mask_downsampler.embed_dim={MICRO_HIDDEN}",
    f"++model.memory_encoder.fuser.layer.dim={MICRO_HIDDEN}",
)
# mini: micro with a Hiera trunk twice as wide and one block deeper per middle stage (32
# channels, stages [1,2,3,1]): the features the mask decoder draws a thin vessel from. Everything
# after the neck keeps micro's shapes, so micro weights warm-start it. 3.7 M parameters; the trunk
# costs ~12 vs ~7 ms a frame eager at 256 px.
MINI_TRUNK = (
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.stages=[1,2,3,1]",
    "++model.image_encoder.trunk.global_att_blocks=[4]",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
)
_TRUNK_KEYS = tuple(o.split("=")[0] for o in MINI_TRUNK)
MINI_OVERRIDES = (*(o for o in MICRO_OVERRIDES if o.split("=")[0] not in _TRUNK_KEYS),
                  *MINI_TRUNK)
# Random weights put every object score near -0.09, so every mask is NO_OBJ_SCORE and parity
# checks compare empty masks. +0.3 on the presence head's bias makes regions present on every
# frame (notes/sam2_parity.md); only random-init models get it, and the manifest says so.
RANDOM_PRESENCE_BIAS = 0.3


class CheckpointError(InputError):
    """A checkpoint is unreadable or does not fit the config it is loaded into."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a checkpoint and its config, or a random-init name."""

    image_size: int = 1024
    checkpoint: Path | None = None
    config: str | None = None  # a CONFIGS name or a sam2 config path
    random_init: str | None = None  # one of RANDOM_INIT
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.random_init is None):
            raise InputError("give either a checkpoint (with its config) or random_init, "
                             f"not both or neither (got checkpoint={self.checkpoint}, "
                             f"random_init={self.random_init})")
        if self.checkpoint is not None and self.config is None:
            raise InputError(f"checkpoint {self.checkpoint} needs its config: one of "
                             f"{sorted(CONFIGS)} (or {' or '.join(SMALL_CONFIGS)}) or a sam2 "
                             "config path")
        if self.random_init is not None and self.config is not None:
            raise InputError(f"random_init {self.random_init!r} builds its own config; drop "
                             f"config {self.config!r} (it goes with a checkpoint)")
        if self.random_init is not None and self.random_init not in RANDOM_INIT:
            raise InputError(f"random_init {self.random_init!r}: expected one of {RANDOM_INIT}")
        if self.image_size not in IMAGE_SIZES:
            raise InputError(f"image_size {self.image_size}: expected one of {IMAGE_SIZES} "
                             "(a multiple of 32 so Hiera's 8x8 windows tile the 1/4 grid)")
        if self.image_size == 256 and not {self.random_init, self.config} & set(SMALL_CONFIGS):
            raise InputError(f"image_size 256 is for the {' and '.join(SMALL_CONFIGS)} models "
                             "only; real configs run at 1024 (sam2) or 512 (MedSAM2)")

    @property
    def name(self) -> str:
        """Short model name, e.g. "tiny" or "micro"."""
        if self.random_init is not None:
            return self.random_init
        if self.config in SMALL_CONFIGS:
            return self.config
        short = {path: name for name, path in CONFIGS.items()}
        return short.get(config_path(self.config), Path(str(self.config)).stem)


def config_path(name: str) -> str:
    """The sam2 config path for a CONFIGS name, a config file name or a config path."""
    if name in SMALL_CONFIGS:
        return CONFIGS["tiny"]
    if name in CONFIGS:
        return CONFIGS[name]
    stem = Path(name).name.removesuffix(".yaml")
    for path in CONFIGS.values():
        if Path(path).stem == stem:
            return path
    raise InputError(f"config {name!r}: expected one of {sorted(CONFIGS)} or one of "
                     f"{sorted(CONFIGS.values())}")


def size_overrides(image_size: int) -> list[str]:
    """Hydra overrides that move a config to `image_size`: the RoPE tables follow the features.

    RoPEAttention silently recomputes its table for a square map when the token count differs,
    so eager code "works" with stale feat_sizes while an export bakes in what it traced.
    """
    side = image_size // 16
    return [f"++model.image_size={image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{side},{side}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{side},{side}]"]


def build(config: str, image_size: int, extra: tuple[str, ...] = ()) -> nn.Module:
    """A `SAM2VideoPredictor` (random weights, eval mode, CPU) from sam2's own builder."""
    from sam2.build_sam import build_sam2_video_predictor

    # tiny's config with the micro or mini overrides: such a checkpoint's config
    small = {"micro": MICRO_OVERRIDES, "mini": MINI_OVERRIDES}
    if config in small:
        extra = (*small[config], *extra)
    overrides = [*size_overrides(image_size), *extra]
    return build_sam2_video_predictor(config_path(config), ckpt_path=None, device="cpu",
                                      hydra_overrides_extra=overrides)


def random_model(name: str, image_size: int, seed: int = 0) -> nn.Module:
    """A random-init model (one of RANDOM_INIT) with regions made present (see above)."""
    if name not in RANDOM_INIT:
        raise InputError(f"random_init {name!r}: expected one of {RANDOM_INIT}")
    torch.manual_seed(seed)
    model = build(name, image_size)
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += RANDOM_PRESENCE_BIAS
    return model


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _stored_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a `.safetensors` file written by `rau-rt train sam2`; {} for a `.pt`."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file "
                              f"({exc})") from exc


def stored_config(path: str | Path) -> str | None:
    """The config a `.safetensors` file written by `rau-rt train sam2` names in its metadata
    (e.g. "micro" for the shipped demo weights); None for a `.pt` or a file without one."""
    return _stored_metadata(path).get("config")


def stored_memory_pool(path: str | Path | None) -> int:
    """The memory token pooling weights were trained with (`rau-rt train sam2 --memory-pool`:
    the `.safetensors` metadata, or "memory_pool" beside "model" in a run's `sam2.pt`); 1,
    sam2's, for Meta's checkpoints, older files and no checkpoint."""
    if path is None:
        return 1
    path = Path(path)
    if path.suffix == ".safetensors":
        value = _stored_metadata(path).get("memory_pool", "1")
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # _read_state says what is wrong with the file when it loads it
            return 1
        value = data.get("memory_pool", 1) if isinstance(data, dict) else 1
    try:
        return int(value)
    except ValueError:
        raise CheckpointError(f"checkpoint {path}: metadata memory_pool {value!r} is not a "
                              "number") from None


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of Meta's `{"model": state_dict}` .pt or of a .safetensors file (the
    project's shipped demo weights: fp16, read back as fp32)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return {k: v.float() for k, v in load_file(path).items()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file "
                                  f"({exc})") from exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} does not load with torch.load(weights_only="
                              f"True) ({type(exc).__name__}: {exc}); expected Meta's "
                              "sam2.1_hiera_*.pt ({'model': state_dict})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"checkpoint {path}: expected a dict with a 'model' state_dict "
                              f"(Meta's format), got {keys}")
    return data["model"]


def load_checkpoint(path: str | Path, config: str, image_size: int) -> nn.Module:
    """Load Meta's `{"model": state_dict}` checkpoint (or a `.safetensors` state dict) into the
    model `config` builds.

    Raises:
        CheckpointError: the file is not such a checkpoint, or its keys/shapes do not fit the
            config (the message names the mismatching keys and the config tried).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    state = _read_state(path)
    model = build(config, image_size)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                    for k, v in expected.items()
                    if k in state and tuple(state[k].shape) != tuple(v.shape))
    if missing or unexpected or shapes:
        parts = [f"{label}: {_describe(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected),
                  ("shape (checkpoint vs config)", shapes)) if keys]
        raise CheckpointError(f"checkpoint {path} does not fit config {config_path(config)} "
                              f"({'; '.join(parts)}); pass the config the checkpoint was "
                              f"trained with (one of {sorted(CONFIGS)})")
    model.load_state_dict(state)
    return model.eval()


def warm_start(model: nn.Module, path: str | Path) -> list[str]:
    """Copy into `model` every tensor of checkpoint `path` whose name and shape fit (a micro
    checkpoint into a mini model: all but the trunk and the neck's input convolutions); the
    rest keep their random initialisation. Returns the names left fresh.

    Raises:
        CheckpointError: the file is not a checkpoint, or none of its tensors fits.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    state = _read_state(path)
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fits:
        raise CheckpointError(f"checkpoint {path}: none of its {len(state)} tensors fits this "
                              "model (names or shapes differ everywhere)")
    model.load_state_dict(fits, strict=False)
    return sorted(set(own) - set(fits))


def load_model(source: ModelSource) -> nn.Module:
    """The eval-mode CPU model `source` describes."""
    if source.random_init is not None:
        return random_model(source.random_init, source.image_size, source.seed).eval()
    return load_checkpoint(source.checkpoint, source.config, source.image_size)


def rope_tables(attention: nn.Module, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [side*side, head_dim/2] of a sam2 RoPEAttention's complex table."""
    cis = attention.compute_cis(end_x=side, end_y=side)
    return cis.real.float().contiguous(), cis.imag.float().contiguous()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """sam2's `apply_rotary_enc` in real arithmetic: pairs (2i, 2i+1) rotate by the table's angle.

    Args:
        x: [..., tokens, head_dim] with tokens a multiple of the table's rows (memory frames
            repeat the spatial table, as `repeat_freqs_k` does); the count of memory frames may
            be dynamic (it is folded into a broadcast axis, not a data-dependent repeat).
    """
    rows = cos.shape[0]
    *lead, tokens, dim = x.shape
    pairs = x.float().reshape(*lead, tokens // rows, rows, dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.reshape(x.shape).type_as(x)


def rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` with a table row per token and batch item: x [B, H, tokens, head_dim], cos and
    sin [B, tokens, head_dim/2] (a table gathered at each item's own token positions: the
    windowed memory attention's queries)."""
    dim = x.shape[-1]
    pairs = x.float().reshape(*x.shape[:-1], dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.reshape(x.shape).type_as(x)


def pool_keys(x: torch.Tensor, side: int, pool: int) -> torch.Tensor:
    """[B, H, frames*side*side, d] spatial keys or values -> [B, H, frames*(side/pool)^2, d]:
    the mean of each pool x pool block of a frame's grid (frames may be dynamic)."""
    b, h, _, d = x.shape
    cells = side // pool
    blocks = x.reshape(b, h, -1, cells, pool, cells, pool, d).mean(dim=(4, 6))
    return blocks.reshape(b, h, -1, d)


class RealRoPEAttention(nn.Module):
    """A sam2 RoPEAttention with real-valued rotation (same weights).

    `pool` > 1 (memory token pooling, the tracker's `memory_pool` lever; cross-attention
    only): after RoPE, each memory frame's keys and values are averaged over pool x pool
    blocks of its grid, so the queries attend to (side/pool)^2 tokens per memory instead of
    side^2. A pooled key's score is the mean of its block's scores (q . mean(R_i k_i)), each
    key rotated at its own position, plus log(pool^2) (`_pooled_attention`); object pointers
    are not pooled. Not sam2's computation: a trade of accuracy for speed that the benchmarks
    measure.
    """

    def __init__(self, attention: nn.Module, side: int, pool: int = 1) -> None:
        super().__init__()
        if pool < 1 or side % pool:
            raise InputError(f"memory pool {pool}: expected >= 1 and a divisor of the feature "
                             f"side {side}")
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.out_proj = attention.v_proj, attention.out_proj
        self.num_heads = attention.num_heads
        self.side, self.pool = side, pool
        cos, sin = rope_tables(attention, side)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _pooled_attention(self, q, spatial_k, spatial_v, pointer_k, pointer_v) -> torch.Tensor:
        """Attention over the pooled memory keys and the whole pointers. A pooled key stands
        for pool^2 keys, so its score gets + log(pool^2): the softmax mass its block would
        have had if their scores were equal (without it, the pointers took over and Dice fell
        by 0.16 on the trained micro SAM2; with it by 0.04). The bias rides in one extra
        channel (1 on the queries, the bias over the scale on the keys, 0 on the values), so
        the attention stays unmasked SDPA, which ONNX Runtime's fused kernel runs."""
        spatial_k = pool_keys(spatial_k, self.side, self.pool)
        spatial_v = pool_keys(spatial_v, self.side, self.pool)
        dim = q.shape[-1]
        scale = dim ** -0.5
        bias = math.log(self.pool ** 2) / scale
        q = torch.cat((q, torch.ones_like(q[..., :1])), dim=-1)
        k = torch.cat((torch.cat((spatial_k, torch.full_like(spatial_k[..., :1], bias)), -1),
                       torch.cat((pointer_k, torch.zeros_like(pointer_k[..., :1])), -1)), dim=2)
        v = torch.cat((spatial_v, pointer_v), dim=2)
        v = torch.cat((v, torch.zeros_like(v[..., :1])), dim=-1)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :dim]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                num_k_exclude_rope: int | torch.SymInt = 0,
                window: torch.Tensor | None = None, keys_in_window: bool = False,
                ) -> torch.Tensor:
        """Attention of q over k/v; the last `num_k_exclude_rope` keys (pointers) skip RoPE.

        `window` [B, T] int64: the grid positions (row-major token indices) of each item's T
        queries, when they are not the whole grid (the windowed memory attention);
        `keys_in_window`: the keys sit at those positions too (its self-attention), else they
        are whole grids (memory frames)."""
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        rope_keys = k.shape[-2] - num_k_exclude_rope
        if window is None:
            q = rotate(q, self.cos, self.sin)
            spatial_k = rotate(k[:, :, :rope_keys], self.cos, self.sin)
        else:
            cos, sin = self.cos[window], self.sin[window]
            q = rotate_rows(q, cos, sin)
            spatial_k = (rotate_rows(k[:, :, :rope_keys], cos, sin) if keys_in_window
                         else rotate(k[:, :, :rope_keys], self.cos, self.sin))
        spatial_v = v[:, :, :rope_keys]
        pointer_k, pointer_v = k[:, :, rope_keys:], v[:, :, rope_keys:]
        if self.pool > 1:
            out = self._pooled_attention(q, spatial_k, spatial_v, pointer_k, pointer_v)
        else:
            out = F.scaled_dot_product_attention(q, torch.cat((spatial_k, pointer_k), dim=2),
                                                 torch.cat((spatial_v, pointer_v), dim=2))
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class RealMemoryAttention(nn.Module):
    """sam2's MemoryAttention (batch-first tokens) over RealRoPEAttention.

    Calls the original layers' norms, MLPs and dropout-free residuals in the order
    `MemoryAttentionLayer.forward` does; it equals the original to float rounding
    (tests/test_export_sam2_model.py). `pool` > 1 pools the memory keys of every layer's
    cross-attention (`RealRoPEAttention`): an approximation, not sam2's result.
    """

    def __init__(self, memory_attention: nn.Module, side: int, pool: int = 1) -> None:
        super().__init__()
        self.source = memory_attention
        self.self_attn = nn.ModuleList(RealRoPEAttention(layer.self_attn, side)
                                       for layer in memory_attention.layers)
        self.cross_attn = nn.ModuleList(RealRoPEAttention(layer.cross_attn_image, side, pool)
                                        for layer in memory_attention.layers)

    def forward(self, curr: torch.Tensor, curr_pos: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, num_obj_ptr_tokens: int | torch.SymInt,
                window: torch.Tensor | None = None) -> torch.Tensor:
        """[B, HW, D] current tokens + [B, Nk, M] memory tokens -> [B, HW, D] conditioned.

        `curr` and `curr_pos` may have batch 1 for B regions of one frame: the first layer's
        self-attention sees only the frame's tokens, so it runs once and its output is shared
        (broadcast) by the regions; everything after it depends on each region's memory.

        `window` [B, T] int64 (with `curr` of batch 1): only the tokens at these grid positions
        are conditioned, each region its own T, and the result is [B, T, D]. Their
        self-attention sees only the window's tokens, so this is not sam2's result for them
        (the tracker's `memory_window` lever); the memory keys are whole, as in sam2.
        """
        source = self.source
        if window is not None:
            curr, curr_pos = curr[0][window], curr_pos[0][window]
        output = curr + 0.1 * curr_pos if source.pos_enc_at_input else curr
        for index, (layer, self_attn, cross_attn) in enumerate(zip(
                source.layers, self.self_attn, self.cross_attn, strict=True)):
            tgt2 = layer.norm1(output)
            q = k = tgt2 + curr_pos if layer.pos_enc_at_attn else tgt2
            output = output + self_attn(q, k, tgt2, window=window, keys_in_window=True)
            if index == 0 and window is None:
                output = output.expand(memory.shape[0], -1, -1)
            tgt2 = layer.norm2(output)
            output = output + cross_attn(
                tgt2 + curr_pos if layer.pos_enc_at_cross_attn_queries else tgt2,
                memory + memory_pos if layer.pos_enc_at_cross_attn_keys else memory,
                memory, num_k_exclude_rope=num_obj_ptr_tokens, window=window)
            tgt2 = layer.norm3(output)
            output = output + layer.linear2(layer.activation(layer.linear1(tgt2)))
        return source.norm(output)


def feature_side(model: nn.Module) -> int:
    """Side of the stride-16 feature map (64 at 1024 px)."""
    return model.image_size // 16

