"""SAM2 export wrappers against sam2's own code paths, eager, on a random-weight micro model.

Each wrapper in `rau_rt.export.sam2.graphs` must compute what sam2 1.1.0 computes for the same
frame: the real-valued RoPE equals the complex one, the compacted memory equals sam2's own
gathering (`_prepare_memory_conditioned_features`), and the decoder/memory encoder equal
`_forward_sam_heads`/`_encode_new_memory`. Also: checkpoints in Meta's format load through
the user's path, and bad ones fail naming the keys.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from rau_rt.errors import InputError
from rau_rt.export.sam2 import graphs as sam2_graphs
from rau_rt.export.sam2 import model as sam2_model
from rau_rt.export.sam2.inputs import CheckFrames, build_inputs, select_output
from rau_rt.synthetic import generate_sequence

SIZE = 256


@functools.cache
def check_frames() -> CheckFrames:
    """3 synthetic angiography frames with the boxes of the 2 largest segments."""
    return CheckFrames.synthetic(generate_sequence, regions=2)


@pytest.fixture(scope="module")
def micro():
    model = sam2_model.random_model("micro", SIZE)
    modules = sam2_graphs.graph_modules(model)
    return model, modules, build_inputs(model, modules, check_frames())


def test_real_rope_equals_complex_rope_with_repeated_keys():
    from sam2.modeling.position_encoding import apply_rotary_enc

    torch.manual_seed(0)
    attention = sam2_model.build("micro", SIZE).memory_attention.layers[0].cross_attn_image
    cos, sin = sam2_model.rope_tables(attention, SIZE // 16)
    q = torch.randn(2, 1, 256, 128)
    k = torch.randn(2, 1, 3 * 256, 128)
    q_ref, k_ref = apply_rotary_enc(q, k, attention.compute_cis(end_x=16, end_y=16),
                                    repeat_freqs_k=True)
    assert torch.equal(sam2_model.rotate(q, cos, sin), q_ref)
    assert torch.equal(sam2_model.rotate(k, cos, sin), k_ref)


def test_memory_attention_all_keys_valid_equals_sam2(micro):
    model, _, _ = micro
    real = sam2_model.RealMemoryAttention(model.memory_attention, SIZE // 16)
    torch.manual_seed(1)
    tokens, pointer_tokens = 256, 8
    curr, curr_pos = torch.randn(tokens, 2, 128), torch.randn(tokens, 2, 128)
    memory = torch.randn(2 * tokens + pointer_tokens, 2, 32)
    memory_pos = torch.randn_like(memory)
    with torch.no_grad():
        ref = model.memory_attention(curr, memory, curr_pos, memory_pos,
                                     num_obj_ptr_tokens=pointer_tokens)
        ours = real(curr.transpose(0, 1), curr_pos.transpose(0, 1), memory.transpose(0, 1),
                    memory_pos.transpose(0, 1), pointer_tokens)
    assert (ours - ref.transpose(0, 1)).abs().max().item() <= 1e-6


def test_pooled_cross_attention_attends_to_block_means_of_rotated_keys():
    """memory_pool 2: each memory frame's rotated keys and its values are averaged over 2x2
    blocks of its grid (written here block by block), a pooled key's score gets + log 4 (here
    as an attention mask), pointers stay whole."""
    torch.manual_seed(4)
    side, frames, pointer_tokens = SIZE // 16, 2, 8
    attention = sam2_model.build("micro", SIZE).memory_attention.layers[0].cross_attn_image
    pooled = sam2_model.RealRoPEAttention(attention, side, pool=2)
    q = torch.randn(2, side * side, 128)
    k = torch.randn(2, frames * side * side + pointer_tokens, 32)
    v = torch.randn_like(k)
    with torch.no_grad():
        ours = pooled(q, k, v, num_k_exclude_rope=pointer_tokens)
        qh, kh, vh = (pooled._heads(proj(x)) for proj, x in
                      ((pooled.q_proj, q), (pooled.k_proj, k), (pooled.v_proj, v)))
        qh = sam2_model.rotate(qh, pooled.cos, pooled.sin)
        spatial = frames * side * side
        kr = sam2_model.rotate(kh[:, :, :spatial], pooled.cos, pooled.sin)
        keys, values = [], []
        for f in range(frames):
            for by in range(side // 2):
                for bx in range(side // 2):
                    cells = [f * side * side + (2 * by + dy) * side + 2 * bx + dx
                             for dy in (0, 1) for dx in (0, 1)]
                    keys.append(kr[:, :, cells].mean(2))
                    values.append(vh[:, :, cells].mean(2))
        keys = torch.cat([torch.stack(keys, 2), kh[:, :, spatial:]], 2)
        values = torch.cat([torch.stack(values, 2), vh[:, :, spatial:]], 2)
        pooled_keys = frames * (side // 2) ** 2
        bias = torch.cat([torch.full((pooled_keys,), math.log(4)), torch.zeros(pointer_tokens)])
        out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=bias[None])
        b, h, n, d = out.shape
        ref = pooled.out_proj(out.transpose(1, 2).reshape(b, n, h * d))
    assert (ours - ref).abs().max().item() <= 1e-5
    with pytest.raises(InputError, match="divisor"):
        sam2_model.RealRoPEAttention(attention, side, pool=3)


def test_windowed_memory_attention_is_sam2s_layers_on_each_regions_window():
    """memory_window: each region's window tokens go through sam2's own layers: self-attention
    among the window's tokens only (sam2's RoPEAttention on the window as a grid of its own:
    its RoPE is relative, so the window's offset cancels), cross-attention of the window's
    queries, rotated at their positions in the whole grid, to the whole memory (sam2's complex
    RoPE); windows differ per region."""
    from sam2.modeling.position_encoding import apply_rotary_enc

    torch.manual_seed(5)
    side, frames, pointer_tokens = SIZE // 16, 2, 8
    source = sam2_model.build("micro", SIZE).memory_attention.eval()
    real = sam2_model.RealMemoryAttention(source, side)
    tokens, window = side * side, side // 2
    curr, curr_pos = torch.randn(1, tokens, 128), torch.randn(1, tokens, 128)
    memory = torch.randn(2, frames * tokens + pointer_tokens, 32)
    memory_pos = torch.randn_like(memory)
    corners = [(0, 0), (5, 3)]  # (row, column) of each region's window
    index = torch.stack([torch.tensor([(y + i) * side + x + j for i in range(window)
                                       for j in range(window)]) for y, x in corners])
    with torch.no_grad():
        ours = real(curr, curr_pos, memory, memory_pos, pointer_tokens, window=index)
        table = source.layers[0].cross_attn_image.compute_cis(end_x=side, end_y=side)
        for r in range(2):
            x, pos = curr[:, index[r]], curr_pos[:, index[r]]
            values = memory[r:r + 1]
            keys = (memory + memory_pos)[r:r + 1]
            out = x + 0.1 * pos if source.pos_enc_at_input else x
            for layer in source.layers:
                t = layer.norm1(out)
                q = t + pos if layer.pos_enc_at_attn else t
                out = out + layer.self_attn(q, q, t)
                t = layer.norm2(out)
                cross = layer.cross_attn_image
                queries = t + pos if layer.pos_enc_at_cross_attn_queries else t
                qh = cross._separate_heads(cross.q_proj(queries), cross.num_heads)
                kh = cross._separate_heads(cross.k_proj(
                    keys if layer.pos_enc_at_cross_attn_keys else values), cross.num_heads)
                vh = cross._separate_heads(cross.v_proj(values), cross.num_heads)
                qh, _ = apply_rotary_enc(qh, qh[:, :, :0], table[index[r]])
                spatial = frames * tokens
                _, rotated = apply_rotary_enc(torch.zeros_like(kh[:, :, :tokens]),
                                              kh[:, :, :spatial], table, repeat_freqs_k=True)
                kh = torch.cat([rotated, kh[:, :, spatial:]], 2)
                attended = F.scaled_dot_product_attention(qh, kh, vh)
                out = out + cross.out_proj(cross._recombine_heads(attended))
                t = layer.norm3(out)
                out = out + layer.linear2(layer.activation(layer.linear1(t)))
            ref = source.norm(out)
            assert (ours[r:r + 1] - ref).abs().max().item() <= 1e-4, r
    assert ours.shape == (2, window * window, 128)
    assert not torch.allclose(ours[0], ours[1])


def test_compacted_memory_equals_sam2_prepare_memory_conditioned_features(micro):
    """At frame 2 sam2 gathers frame 0 (conditioning) and frame 1 (tracked): 2 and 2."""
    model, modules, inputs = micro
    feeds = inputs.example["memory_attention"]
    assert feeds["memory_tpos_index"][0].tolist() == [6, 0]
    assert feeds["object_pointers"].shape[1] == 2

    def frame(index):
        return {"maskmem_features": feeds["memory"][:, index],
                "maskmem_pos_enc": [feeds["memory_pos"][:, index]],
                "obj_ptr": feeds["object_pointers"][:, [0, 1][index]]}

    output_dict = {"cond_frame_outputs": {0: frame(0)}, "non_cond_frame_outputs": {1: frame(1)}}
    side = SIZE // 16
    flat = [t.flatten(2).permute(2, 0, 1) for t in (feeds["current_features"],
                                                     feeds["current_pos"])]
    regions = feeds["memory"].shape[0]
    with torch.no_grad():
        ref = model._prepare_memory_conditioned_features(
            frame_idx=2, is_init_cond_frame=False,
            current_vision_feats=[flat[0].expand(-1, regions, -1)],
            current_vision_pos_embeds=[flat[1].expand(-1, regions, -1)],
            feat_sizes=[(side, side)], output_dict=output_dict, num_frames=100)
        ours = modules["memory_attention"](*feeds.values())
    assert (ours - ref).abs().max().item() <= 1e-5


def test_memory_attention_takes_any_memory_count(micro):
    """8 memories and 17 pointers (2 conditioning frames at steady state) equal sam2 too."""
    model, modules, inputs = micro
    example = inputs.example["memory_attention"]
    torch.manual_seed(3)
    regions, _, mem_dim, side, _ = example["memory"].shape
    memory = torch.randn(regions, 8, mem_dim, side, side)
    memory_pos = torch.randn_like(memory)
    pointers = torch.randn(regions, 17, model.hidden_dim)
    # frame 30: conditioning frames -1 (reference) and 10 (a prompt), tracked 24 ... 29;
    # pointers of both conditioning frames and of t-1 ... t-15
    cond_frames, tracked = [-1, 10], list(range(24, 30))
    pointer_frames = [-1, 10, *range(29, 14, -1)]

    def stored(i, p):
        return {"maskmem_features": memory[:, i], "maskmem_pos_enc": [memory_pos[:, i]],
                "obj_ptr": pointers[:, p]}

    output_dict = {
        "cond_frame_outputs": {f: stored(i, i) for i, f in enumerate(cond_frames)},
        "non_cond_frame_outputs": {f: stored(2 + i, pointer_frames.index(f))
                                   for i, f in enumerate(tracked)}}
    # pointers of frames 15 ... 23 live only in non-cond outputs without a spatial memory slot
    for f in pointer_frames[2:]:
        if f not in tracked:
            output_dict["non_cond_frame_outputs"][f] = {
                "maskmem_features": memory[:, 2], "maskmem_pos_enc": [memory_pos[:, 2]],
                "obj_ptr": pointers[:, pointer_frames.index(f)]}
    flat = [t.flatten(2).permute(2, 0, 1) for t in (example["current_features"],
                                                     example["current_pos"])]
    feeds = {"current_features": example["current_features"],
             "current_pos": example["current_pos"], "memory": memory, "memory_pos": memory_pos,
             "memory_tpos_index": torch.tensor([[6, 6, 5, 4, 3, 2, 1, 0]] * regions),
             "object_pointers": pointers,
             "pointer_position": torch.tensor([[(30 - f) / 15 for f in pointer_frames]] * regions)}
    with torch.no_grad():
        ref = model._prepare_memory_conditioned_features(
            frame_idx=30, is_init_cond_frame=False,
            current_vision_feats=[flat[0].expand(-1, regions, -1)],
            current_vision_pos_embeds=[flat[1].expand(-1, regions, -1)],
            feat_sizes=[(side, side)], output_dict=output_dict, num_frames=100)
        ours = modules["memory_attention"](*feeds.values())
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tracking", [False, True], ids=["box", "tracking"])
def test_decoder_and_selection_equal_forward_sam_heads(micro, tracking):
    model, modules, inputs = micro
    feeds = dict(inputs.calibration["mask_decoder"][1 if tracking else 0])
    regions = feeds["image_embed"].shape[0]
    high_res = [feeds["high_res_0"].expand(regions, -1, -1, -1),
                feeds["high_res_1"].expand(regions, -1, -1, -1)]
    points = None if tracking else {"point_coords": feeds["point_coords"],
                                    "point_labels": feeds["point_labels"]}
    with torch.no_grad():
        _, _, _, low_res, _, pointer, score = model._forward_sam_heads(
            feeds["image_embed"], point_inputs=points, high_res_features=high_res,
            multimask_output=tracking)
        masks, iou, pointers, our_score = modules["mask_decoder"](*feeds.values())
        mask, our_pointer = select_output(model, masks, iou, pointers, multimask=tracking)
    assert (mask - low_res).abs().max().item() <= 1e-5
    assert (our_pointer - pointer).abs().max().item() <= 1e-5
    assert torch.equal(our_score, score)


def test_mask_input_replaces_the_no_mask_embedding_per_region(micro):
    model, modules, inputs = micro
    feeds = dict(inputs.example["mask_decoder"])
    feeds["mask_input"] = torch.randn_like(feeds["mask_input"])
    feeds["has_mask_input"] = torch.tensor([True, False])
    with torch.no_grad():
        masks, iou, pointers, _ = modules["mask_decoder"](*feeds.values())
        chosen, _ = select_output(model, masks[:1], iou[:1], pointers[:1], multimask=False)
        _, _, _, with_mask, _, _, _ = model._forward_sam_heads(
            feeds["image_embed"][:1],
            point_inputs={"point_coords": feeds["point_coords"][:1],
                          "point_labels": feeds["point_labels"][:1]},
            mask_inputs=feeds["mask_input"][:1],
            high_res_features=[feeds["high_res_0"], feeds["high_res_1"]])
        plain = modules["mask_decoder"](*inputs.example["mask_decoder"].values())[0]
    assert (chosen - with_mask).abs().max().item() <= 1e-5
    assert torch.equal(masks[1], plain[1])
    assert not torch.allclose(masks[0], plain[0])


def test_memory_encoder_equals_encode_new_memory(micro):
    model, modules, inputs = micro
    feeds = inputs.example["memory_encoder"]
    assert feeds["binarize"].tolist() == [True, False]
    side = SIZE // 16
    high = F.interpolate(feeds["masks"], size=(SIZE, SIZE), mode="bilinear",
                         align_corners=False)
    flat = feeds["vision_features"].flatten(2).permute(2, 0, 1)
    with torch.no_grad():
        memory, memory_pos = modules["memory_encoder"](*feeds.values())
        for region, from_points in enumerate((True, False)):
            ref, ref_pos = model._encode_new_memory(
                current_vision_feats=[flat], feat_sizes=[(side, side)],
                pred_masks_high_res=high[region:region + 1],
                object_score_logits=feeds["object_score"][region:region + 1],
                is_mask_from_pts=from_points)
            assert (memory[region] - ref[0]).abs().max().item() <= 1e-5
            assert torch.equal(memory_pos[region], ref_pos[-1][0])


def test_image_encoder_equals_forward_image(micro):
    model, modules, inputs = micro
    image = inputs.example["image_encoder"]["image"]
    with torch.no_grad():
        out = model.forward_image(image)
        _, feats, pos, _ = model._prepare_backbone_features(out)
        ours = modules["image_encoder"](image)
    side = SIZE // 16
    assert torch.equal(ours[2], feats[-1].permute(1, 2, 0).reshape(1, -1, side, side))
    assert torch.equal(ours[3], pos[-1].permute(1, 2, 0).reshape(1, -1, side, side))
    assert torch.equal(ours[0], out["backbone_fpn"][0])
    no_memory = feats[-1] + model.no_mem_embed
    assert torch.equal(ours[4], no_memory.permute(1, 2, 0).reshape(1, -1, side, side))


def test_micro_checkpoint_in_meta_format_loads_through_the_user_path(tmp_path):
    model = sam2_model.random_model("micro", SIZE, seed=3)
    path = tmp_path / "micro.pt"
    torch.save({"model": model.state_dict()}, path)
    loaded = sam2_model.load_model(sam2_model.ModelSource(image_size=SIZE, checkpoint=path,
                                                          config="micro"))
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_missing_and_unexpected_keys_are_named(tmp_path):
    path = tmp_path / "micro.pt"
    state = sam2_model.random_model("micro", SIZE).state_dict()
    del state["no_obj_ptr"]
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, path)
    with pytest.raises(sam2_model.CheckpointError) as error:
        sam2_model.load_checkpoint(path, "micro", SIZE)
    message = str(error.value)
    assert "missing: no_obj_ptr;" in message and "unexpected: extra.weight" in message


def test_wrong_config_names_the_mismatching_shapes(tmp_path):
    path = tmp_path / "micro.pt"
    torch.save({"model": sam2_model.random_model("micro", SIZE).state_dict()}, path)
    with pytest.raises(sam2_model.CheckpointError) as error:
        sam2_model.load_checkpoint(path, "tiny", 512)
    message = str(error.value)
    assert "image_encoder.neck.convs.0.conv.weight (128, 128, 1, 1) vs (256, 768, 1, 1)" in message
    assert "missing: image_encoder.trunk.blocks.10.attn.proj.bias" in message
    assert "configs/sam2.1/sam2.1_hiera_t.yaml" in message and "(262 in all)" in message


@pytest.mark.parametrize("content", [b"not a checkpoint", None], ids=["corrupt", "no-model-key"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(sam2_model.CheckpointError, match="Meta's"):
        sam2_model.load_checkpoint(path, "micro", SIZE)


def test_model_source_rejects_contradictions(tmp_path):
    with pytest.raises(InputError, match="either a checkpoint"):
        sam2_model.ModelSource()
    with pytest.raises(InputError, match="needs its config"):
        sam2_model.ModelSource(checkpoint=tmp_path / "x.pt")
    with pytest.raises(InputError, match="micro and mini models only"):
        sam2_model.ModelSource(image_size=256, random_init="tiny")
    sam2_model.ModelSource(image_size=256, random_init="mini")  # the wider demo config: allowed
    with pytest.raises(InputError, match="expected one of"):
        sam2_model.ModelSource(image_size=640, random_init="micro")
