"""Load a fine-tuned Qwen-VL folder, or build a random-init one with a local tokenizer.

A user's fine-tune is a Hugging Face folder (config.json, weights, tokenizer files). The
exporter loads it here and fails early, naming what is missing, when the architecture is not
one `rau_rt.vlm_layout.FAMILIES` knows or the tokenizer files are absent.
`--random-init tiny|small|3b` writes such a folder itself (random weights, a byte-level BPE
tokenizer trained locally on a few prompts with the real Qwen special tokens), so tests,
benchmarks and the demo take the same path a user does.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from rau_rt.errors import InputError
from rau_rt.vlm_layout import FAMILIES, VlmFamily

# Qwen2.5-VL's special tokens, in the order the local tokenizer gives them ids 0..11.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Qwen2-VL's chat template, reduced to what the runtime's chat_prompt reproduces (string
# content or a list of {"type": "image"} / {"type": "text"} parts; default system prompt).
# Qwen3-VL's inserts no default system prompt (`chat_template` drops that branch).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX (and Qwen2.5's tokenizer.json Split pattern)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Text the local BPE is trained on: the prompt and answer vocabulary of RAU.
_CORPUS = ("You are a helpful assistant.", "system user assistant",
           "The first image is the reference with the annotated regions.",
           "Locate the same regions in the second image. Answer in JSON.",
           '[{"bbox_2d": [12, 34, 256, 448], "label": "lad_proximal"}]',
           "0123456789 left anterior descending circumflex right coronary artery segment")


_DEFAULT_SYSTEM_BRANCH = ("{% if loop.first and message['role'] != 'system' %}"
                          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                          "{% endif %}")


def chat_template(fam: VlmFamily) -> str:
    """The local tokenizer's chat template for a family (with or without a default system)."""
    if fam.default_system is None:
        return CHAT_TEMPLATE.replace(_DEFAULT_SYSTEM_BRANCH, "")
    return CHAT_TEMPLATE


@dataclass(frozen=True)
class RandomInit:
    """A random-init model size. tiny: unit tests; small: a 0.5B-class text model (Qwen2.5
    0.5B's 896 x 24 layers, 14 heads, 2 KV heads) with a real-width vision tower (1280);
    3b: Qwen2.5-VL 3B's shapes (text 2048 x 36 layers, 16 heads, 2 KV heads, tied embeddings;
    the full 32-block vision tower), what the memory-bounded export is measured on; micro: the
    demo localizer's size, trained by `rau-rt train vlm`. `dtype` is the stored dtype: small
    and 3b are saved in bf16 like the released checkpoints."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    # std of every matrix: tiny uses 0.3 because at transformers' 0.02 its greedy output is one
    # token repeated 24 times, which would not catch a broken KV cache or position ids; at 0.3
    # the 24 tokens vary with the context.
    weight_std: float = 0.02
    dtype: str = "float32"
    tie_embeddings: bool = False


RANDOM_INIT = {
    "tiny": RandomInit(64, 2, 4, 2, 128, 512, 32, 2, 2, 64, weight_std=0.3,
                       tie_embeddings=True),
    # vocab 151936 as in Qwen2.5 (the lm_head is a large share of a 0.5B model's decode time);
    # vision 1280 wide like the real tower, 8 of its 32 blocks to keep CPU export minutes short.
    "small": RandomInit(896, 24, 14, 2, 4864, 151936, 1280, 8, 16, 3420, dtype="bfloat16"),
    "3b": RandomInit(2048, 36, 16, 2, 11008, 151936, 1280, 32, 16, 3420, dtype="bfloat16",
                     tie_embeddings=True),
    # the demo localizer `rau-rt train vlm` trains from scratch on this CPU (7.7 M parameters)
    "micro": RandomInit(256, 4, 4, 2, 768, 512, 256, 4, 4, 512),
}


def build_tokenizer(directory: Path, fam: VlmFamily) -> None:
    """Train a byte-level BPE on RAU prompt text and save it as a Qwen2 tokenizer folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS, trainer)
    # Then Qwen2's pipeline, as in a real Qwen tokenizer.json and as transformers'
    # Qwen2Tokenizer rebuilds it on load (NFC, then its split regex, which isolates every
    # digit): with plain ByteLevel, "56" was one token for the runtime and two for
    # transformers. Set after training so the merges (and the tiny model's exported tokens)
    # stay those of the plain ByteLevel training.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = chat_template(fam)
    fast.save_pretrained(directory)
    # transformers 5 records its generic backend class; Qwen folders name Qwen2Tokenizer.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2))


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE sections (t, h, w) of a random-init text config: they sum to head_dim / 2, split
    1/4, 3/8, 3/8 like Qwen's 16/24/24."""
    spatial = 3 * (head_dim // 2) // 8
    return [head_dim // 2 - 2 * spatial, spatial, spatial]


def build_random(directory: str | Path, size: str = "tiny", family: str = "qwen2_5_vl",
                 seed: int = 0) -> Path:
    """Write a random-init Qwen-VL model and its local tokenizer to `directory`."""
    import torch
    import transformers

    if size not in RANDOM_INIT:
        raise InputError(f"--random-init {size!r}: choose one of {sorted(RANDOM_INIT)}")
    fam = _family_or_raise(family, "--family")
    s = RANDOM_INIT[size]
    if family == "qwen3_vl" and size == "tiny":
        # one more text layer and vision block, so that two deepstack layers feed the first
        # two of three decoder layers (their order and the layers without one are tested)
        s = replace(s, layers=3, vision_depth=3)
    directory = Path(directory)
    build_tokenizer(directory, fam)
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    head_dim = s.hidden // s.heads
    section = mrope_section(head_dim)
    text = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate,
                vocab_size=s.vocab, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": section},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                bos_token_id=None,
                tie_word_embeddings=s.tie_embeddings)
    vision = dict(depth=s.vision_depth, hidden_size=s.vision_hidden, num_heads=s.vision_heads,
                  intermediate_size=s.vision_intermediate, out_hidden_size=s.hidden,
                  patch_size=fam.patch_size, spatial_merge_size=fam.merge_size,
                  temporal_patch_size=fam.temporal_patch_size)
    if family == "qwen2_5_vl":
        # one windowed and one full-attention block at least, as in the 32-block original
        vision.update(window_size=112, fullatt_block_indexes=[s.vision_depth - 1])
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=s.tie_embeddings)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    elif family == "qwen3_vl":
        config, model_class = _qwen3_vl_config(s, text, vision, ids, head_dim, size)
    else:
        vision.update(embed_dim=s.vision_hidden, hidden_size=s.hidden,
                      mlp_ratio=s.vision_intermediate // s.vision_hidden)
        config = transformers.Qwen2VLConfig(
            text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=s.tie_embeddings)
        model_class = transformers.Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    # built in its stored dtype: a 3b model in fp32 would hold 15 GB
    model = model_class._from_config(config, dtype=getattr(torch, s.dtype)).eval()
    if s.weight_std != config.text_config.initializer_range:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim >= 2:
                    parameter.normal_(0.0, s.weight_std)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(directory, max_shard_size="1GB")  # one shard's bytes at a time
    return directory


def deepstack_indexes(vision_depth: int, text_layers: int) -> list[int]:
    """Vision blocks feeding deepstack, spread like Qwen3-VL's 8, 16, 24 of 27: up to three,
    fewer than the text layers (so some decoder layers take none) and the vision blocks."""
    count = max(1, min(3, vision_depth - 1, text_layers - 1))
    return [round((i + 1) * vision_depth / (count + 1)) - 1 for i in range(count)]


def _qwen3_vl_config(s: RandomInit, text: dict, vision: dict, ids: dict[str, int],
                     head_dim: int, size: str):
    import transformers

    # Qwen3 text layers: explicit head_dim (default 128) and interleaved M-RoPE
    # (t, h, w frequencies alternate instead of three blocks); position ids are the same.
    text = {**text, "head_dim": head_dim,
            "rope_parameters": {**text["rope_parameters"], "mrope_interleaved": True}}
    # a learned 2-D position table resampled to the grid; 48 x 48 in the released models
    side = 16 if size == "tiny" else 48
    vision = {**vision, "num_position_embeddings": side * side,
              "deepstack_visual_indexes": deepstack_indexes(s.vision_depth, s.layers)}
    config = transformers.Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=s.tie_embeddings)
    return config, transformers.Qwen3VLForConditionalGeneration


def _family_or_raise(name: str, what: str) -> VlmFamily:
    if name not in FAMILIES:
        raise InputError(f"{what}: model type {name!r} is not supported; supported: "
                         f"{sorted(FAMILIES)}")
    return FAMILIES[name]


def inspect_folder(directory: str | Path) -> VlmFamily:
    """Check a model folder before loading: supported architecture, weights, tokenizer files.

    Raises:
        InputError: naming the missing file or the unsupported architecture.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InputError(f"{directory}: no config.json; --model takes a Hugging Face model "
                         "folder (config.json, *.safetensors, tokenizer.json)")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or ["?"]
    known = {f.architecture: f for f in FAMILIES.values()}
    if architectures[0] not in known:
        raise InputError(f"{config_path}: architecture {architectures[0]} "
                         f"(model_type {config.get('model_type')!r}) is not supported; "
                         f"supported: {sorted(known)}")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise InputError(f"{directory}: no weights (*.safetensors or *.bin)")
    missing = [name for name in TOKENIZER_FILES if not (directory / name).is_file()]
    if missing:
        raise InputError(f"{directory}: tokenizer files missing: {missing}; the bundle needs "
                         "the fine-tune's tokenizer (copy them from the base model's folder)")
    return known[architectures[0]]


def load(directory: str | Path, stored_dtype: bool = False):
    """(model in eval mode, tokenizer, family) from a checked model folder.

    The model is fp32 unless `stored_dtype`: then it stays in the dtype its weights are stored
    in (bf16 for released Qwen checkpoints), half the memory, and `fp32_compute` runs it in
    fp32 (what the exporter does).
    """
    import torch
    import transformers

    fam = inspect_folder(directory)
    model_class = getattr(transformers, fam.architecture)
    model = model_class.from_pretrained(str(directory),
                                        dtype="auto" if stored_dtype else torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer, fam


# Upper bound on the fp32 bytes of a parameter `fp32_compute` keeps upcast for its whole span.
_PINNED_FP32_BYTES = 64 << 20


@contextmanager
def fp32_compute(model):
    """Run `model`, held in a lower dtype (bf16, fp16), in fp32 for the span of the context.

    Every module that owns parameters gets them upcast around its own forward and restored
    after it, so at most one such module (a linear; the embedding table, the largest) is held
    in fp32 at a time beside the stored weights. Each PreTrainedModel's first parameter stays
    upcast for the whole span: it is what that model's `.dtype` reads (transformers casts
    pixels to `visual.dtype`, and generate builds masks in the model's dtype), and it is small
    (a vision patch embedding). The result equals the model loaded in fp32 (a test checks
    logits and greedy tokens), since every weight's fp32 value is its stored value.
    """
    import torch
    from transformers import PreTrainedModel

    hooks, pinned = [], []

    def upcast(module, _args):
        module._rau_stored = dict(module._parameters)
        for name, parameter in module._rau_stored.items():
            if parameter is not None and parameter.is_floating_point() \
                    and parameter.dtype != torch.float32:
                module._parameters[name] = torch.nn.Parameter(parameter.float(),
                                                              requires_grad=False)

    def restore(module, _args, _output):
        module._parameters.update(module.__dict__.pop("_rau_stored"))

    try:
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                first = next(((m, n) for m in module.modules()
                              for n, p in m._parameters.items()
                              if p is not None and p.is_floating_point()), None)
                if first is None:
                    continue
                parameter = first[0]._parameters[first[1]]
                if parameter.dtype != torch.float32 \
                        and parameter.numel() * 4 <= _PINNED_FP32_BYTES:
                    pinned.append((*first, parameter))
                    first[0]._parameters[first[1]] = torch.nn.Parameter(parameter.float(),
                                                                        requires_grad=False)
        for module in model.modules():
            if any(p is not None and p.is_floating_point() and p.dtype != torch.float32
                   for p in module._parameters.values()):
                hooks += [module.register_forward_pre_hook(upcast),
                          module.register_forward_hook(restore)]
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for module, name, parameter in pinned:
            module._parameters[name] = parameter


def add_outlier_channels(source: str | Path, out: str | Path, channels: int = 2,
                         scale: float = 100.0, seed: int = 0) -> Path:
    """Copy the model folder `source` to `out` with outlier activation channels: the test model
    for int8 methods (issue 19).

    In every decoder layer, `channels` random channels of both RMSNorm weights are multiplied
    by `scale` and the projection columns that read them (q/k/v after the first norm, gate/up
    after the second) divided by it. The model computes the same function, but those MatMuls'
    inputs carry `scale`-times outliers in a few channels, as trained LLMs' do, which a single
    per-tensor int8 activation scale cannot represent.
    """
    import shutil

    import torch

    source = Path(source)
    model, _, _ = load(source)
    text = model.model.language_model
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in text.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm,
                                   (attention.q_proj, attention.k_proj, attention.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                chosen = torch.randperm(norm.weight.numel(), generator=generator)[:channels]
                norm.weight[chosen] *= scale
                for projection in readers:
                    projection.weight[:, chosen] /= scale
    out = Path(out)
    model.save_pretrained(out)
    for file in source.iterdir():  # the tokenizer and chat template, as they were
        if (file.is_file() and not (out / file.name).exists()
                and file.suffix not in (".safetensors", ".bin", ".pt")):
            shutil.copyfile(file, out / file.name)
    return out
