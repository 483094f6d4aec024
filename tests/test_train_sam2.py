"""`rau-rt train sam2`: clips, loss, resumable training, and checkpoints sam2 loads (issue 15,
acceptance: "a 3-step training run on a fixed batch lowers the loss; the checkpoint loads in
sam2's predictor")."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from rau_rt.train import HELD_OUT_SEEDS, TRAIN_SEEDS, VALIDATION_SEEDS  # noqa: E402
from rau_rt.train.sam2_data import ClipSpec, draw_clip, jitter_box  # noqa: E402
from rau_rt.train.sam2_trainer import TrainConfig, clip_loss, new_model, train  # noqa: E402

SPEC = ClipSpec(image_size=256, frames=3)


def _clip(regime: str, first: int = TRAIN_SEEDS.start):
    for seed in range(first, first + 50):
        clip = draw_clip(seed, SPEC, regime)
        if clip is not None:
            return clip
    raise AssertionError(f"no usable {regime} clip in 50 seeds")


def test_seed_ranges_are_disjoint():
    # held-out (benchmark) < validation < training: no training clip is ever scored
    assert HELD_OUT_SEEDS.stop <= VALIDATION_SEEDS.start
    assert VALIDATION_SEEDS.stop <= TRAIN_SEEDS.start


@pytest.mark.parametrize("regime", ["box", "mask", "reference"])
def test_clips_are_what_the_tracker_sees(regime):
    clip = _clip(regime)
    again = _clip(regime)
    assert np.array_equal(clip.images, again.images)  # a clip is a function of its seed
    frames = SPEC.frames + (regime == "reference")
    n = len(clip.regions)
    assert clip.images.shape == (frames, 3, 256, 256) and clip.images.dtype == np.float32
    assert clip.targets.shape == (frames, n, 256, 256) and clip.targets.dtype == bool
    assert 1 <= n <= 4
    for t, boxes in clip.boxes.items():
        assert boxes.shape == (n, 4)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 256).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert clip.supervised[t]
    for t, masks in clip.masks.items():  # a mask prompt is that frame's output: no loss there
        assert np.array_equal(masks, clip.targets[t]) and not clip.supervised[t]
    if regime == "reference":
        assert list(clip.masks) == [0] and all(m.any() for m in clip.masks[0])
    else:
        prompt = clip.masks.get(0, clip.boxes.get(0))
        assert prompt is not None


def test_jittered_boxes_stay_near_the_truth():
    rng = np.random.default_rng(0)
    box = np.array([40, 60, 120, 100], np.float32)
    boxes = np.stack([jitter_box(box, 256, rng) for _ in range(200)])
    exact = (boxes == box).all(axis=1).mean()
    assert 0.15 < exact < 0.45  # about 30 % exact, as a good VLM answer
    moved = np.abs(boxes - box).max(axis=1)
    assert moved.max() <= 0.25 * 80 * 2 + 1  # sides and shift at most 25 % of the width each


def test_three_steps_on_a_fixed_clip_lower_the_loss():
    torch.manual_seed(0)
    cfg = TrainConfig(stages=((3, 3),))
    model = new_model(cfg)[0].train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    clip = _clip("box")
    losses = []
    for _ in range(4):
        loss, _ = clip_loss(model, clip)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[3] < losses[0]


def test_training_resumes_where_it_stopped_and_sam2_loads_the_checkpoint(tmp_path):
    from rau_rt.export.sam2.model import load_checkpoint

    cfg = TrainConfig(stages=((1, 1), (1, 2)), validate_every=2, validation_clips=1, warmup=1)
    straight = train(cfg, tmp_path / "a")

    def stop_after_one(step, values):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", progress=stop_after_one)
    assert json.loads((tmp_path / "b" / "record.json").read_text())["steps_done"] == 1
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert resumed["steps_done"] == straight["steps_done"] == 2
    assert resumed["clip_seeds"] == straight["clip_seeds"]
    a = torch.load(tmp_path / "a" / "sam2.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "sam2.pt", weights_only=True)["model"]
    assert resumed["last_loss"] == straight["last_loss"]
    # the same steps on the same clips. Float sums may round differently between the runs
    # (1e-9), and Adam turns that into up to one learning rate per step on weights whose
    # gradient is near zero: the runs agree to within those two steps, not bit for bit.
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 2 * cfg.lr
    # sam2's own video predictor class, built from the same config, takes the checkpoint
    predictor = load_checkpoint(tmp_path / "a" / "sam2.pt", "micro", 256)
    assert type(predictor).__name__ == "SAM2VideoPredictor"
    assert torch.equal(predictor.state_dict()["sam_mask_decoder.iou_token.weight"],
                       a["sam_mask_decoder.iou_token.weight"])
    assert (tmp_path / "a" / "curve.png").stat().st_size > 0
    record = json.loads((tmp_path / "a" / "record.json").read_text())
    assert record["validation"][-1]["step"] == 2 and "dice_box" in record["validation"][-1]


def test_pooled_memory_training_computes_what_the_pooled_graph_runs():
    from rau_rt.errors import InputError
    from rau_rt.export.sam2.model import RealMemoryAttention, feature_side

    pooled = new_model(TrainConfig(memory_pool=2))[0].eval()
    plain = new_model(TrainConfig())[0].eval()  # the same seed: the same weights
    assert {k: v.shape for k, v in pooled.state_dict().items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in pooled.state_dict().items())
    side, pointers = feature_side(plain), 4
    torch.manual_seed(1)
    curr, curr_pos = torch.randn(2, side * side, 2, plain.hidden_dim)
    memory, memory_pos = torch.randn(2, 2 * side * side + pointers, 2, plain.mem_dim)

    def attend(model):  # sam2's call in _prepare_memory_conditioned_features
        return model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory,
                                      memory_pos=memory_pos, num_obj_ptr_tokens=pointers)

    with torch.no_grad():
        trained_on = attend(pooled).transpose(0, 1)
        graph = RealMemoryAttention(plain.memory_attention, side, pool=2)(
            curr.transpose(0, 1), curr_pos.transpose(0, 1), memory.transpose(0, 1),
            memory_pos.transpose(0, 1), pointers)
        unpooled = attend(plain).transpose(0, 1)
    torch.testing.assert_close(trained_on, graph, atol=1e-5, rtol=1e-5)
    assert (trained_on - unpooled).abs().max() > 1e-2  # pooling is not sam2's computation
    pooled.train()
    attend(pooled).square().mean().backward()  # gradients reach sam2's own parameters
    grad = pooled.memory_attention.layers[0].cross_attn_image.k_proj.weight.grad
    assert grad is not None and grad.abs().max() > 0
    with pytest.raises(InputError, match="memory_pool"):
        TrainConfig(memory_pool=3)


def test_weights_trained_pooled_say_so(tmp_path):
    """The safetensors metadata carries the pooling, which `rau-rt export sam2` writes into
    the bundle's sam2.json (the tracker warns when it runs another)."""
    from safetensors.torch import load_file, save_file

    from rau_rt.export.sam2.model import CheckpointError, stored_memory_pool

    quick = dict(stages=((1, 1),), validate_every=1, validation_clips=1, warmup=1)
    train(TrainConfig(memory_pool=2, **quick), tmp_path / "pooled")
    train(TrainConfig(**quick), tmp_path / "plain")
    assert stored_memory_pool(tmp_path / "pooled" / "sam2.fp16.safetensors") == 2
    assert stored_memory_pool(tmp_path / "plain" / "sam2.fp16.safetensors") == 1
    assert stored_memory_pool(tmp_path / "pooled" / "sam2.pt") == 2
    assert stored_memory_pool(tmp_path / "plain" / "sam2.pt") == 1
    meta = tmp_path / "meta.pt"  # Meta's format: the state dict alone
    torch.save({"model": torch.load(tmp_path / "pooled" / "sam2.pt")["model"]}, meta)
    assert stored_memory_pool(meta) == 1
    assert stored_memory_pool(None) == 1  # random weights
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(tmp_path / "plain" / "sam2.fp16.safetensors"), bad,
              metadata={"memory_pool": "two"})
    with pytest.raises(CheckpointError, match="memory_pool 'two'"):
        stored_memory_pool(bad)


def test_a_run_folder_is_not_overwritten(tmp_path):
    from rau_rt.errors import InputError

    cfg = TrainConfig(stages=((1, 2),), validate_every=1, validation_clips=1, warmup=1)
    train(cfg, tmp_path)
    with pytest.raises(InputError, match="--resume"):
        train(cfg, tmp_path)
    with pytest.raises(InputError, match="same arguments"):
        train(TrainConfig(stages=((3, 2),), validate_every=1, validation_clips=1, warmup=1),
              tmp_path, resume=True)


def test_a_fine_tune_starts_from_the_given_weights_and_records_them(tmp_path):
    cfg = TrainConfig(stages=((1, 1),), validate_every=1, validation_clips=1, warmup=1)
    parent = train(cfg, tmp_path / "parent")
    weights = tmp_path / "parent" / "sam2.fp16.safetensors"
    tuned_cfg = TrainConfig(stages=((1, 2),), validate_every=1, validation_clips=1, warmup=1,
                            init=str(weights), first_clip_seed=TRAIN_SEEDS.start + 1000,
                            regime_weights=(0.0, 1.0, 0.0))
    # before a step, the model holds the parent's weights (fp16, as they ship), not new ones
    start = new_model(tuned_cfg)[0].state_dict()
    trained = torch.load(tmp_path / "parent" / "sam2.pt", weights_only=True)["model"]
    key = "sam_mask_decoder.iou_token.weight"
    assert torch.equal(start[key], trained[key].half().float())
    assert not torch.equal(start[key], new_model(cfg)[0].state_dict()[key])
    tuned = train(tuned_cfg, tmp_path / "tuned")
    assert tuned["init"]["file"] == str(weights)
    assert tuned["init"]["record"]["steps_done"] == parent["steps_done"]
    assert tuned["clip_seeds"][0] == TRAIN_SEEDS.start + 1000


def test_a_partial_init_grows_mini_from_micro_weights_and_names_what_started_random(tmp_path):
    from rau_rt.errors import InputError
    from rau_rt.export.sam2.model import CheckpointError, load_checkpoint

    cfg = TrainConfig(stages=((1, 1),), validate_every=1, validation_clips=1, warmup=1)
    train(cfg, tmp_path / "micro")
    weights = tmp_path / "micro" / "sam2.fp16.safetensors"
    grown_cfg = TrainConfig(config="mini", stages=((1, 1),), validate_every=1,
                            validation_clips=1, warmup=1, init=str(weights), init_partial=True)
    with pytest.raises(CheckpointError, match="shape"):  # without --init-partial: refused
        new_model(TrainConfig(config="mini", init=str(weights)))
    model, fresh = new_model(grown_cfg)
    micro = load_checkpoint(weights, "micro", 256).state_dict()
    mini = model.state_dict()
    copied = [k for k in mini if k not in fresh]
    # everything after the neck's input convolutions comes from micro; the wider trunk is new
    assert all(k.startswith(("image_encoder.trunk.", "image_encoder.neck.convs.")) for k in fresh)
    assert any(k.startswith("image_encoder.trunk.") for k in fresh)
    assert "memory_attention.layers.0.cross_attn_image.q_proj.weight" in copied
    assert all(torch.equal(mini[k], micro[k]) for k in copied)
    grown = train(grown_cfg, tmp_path / "mini")
    assert "image_encoder.trunk.blocks" in grown["init"]["fresh"]
    assert load_checkpoint(tmp_path / "mini" / "sam2.pt", "mini", 256).image_encoder.trunk \
        .patch_embed.proj.out_channels == 32
    with pytest.raises(InputError, match="init_partial"):
        TrainConfig(init_partial=True)


@pytest.mark.parametrize("weights, stages", [((0.5, 0.5), ((1, 2),)), ((0, 0, 0), ((1, 2),)),
                                              ((-1, 1, 1), ((1, 2),)), ((0, 1, 0), ((1, 1),))])
def test_regime_weights_that_cannot_draw_a_clip_are_refused(weights, stages):
    from rau_rt.errors import InputError

    with pytest.raises(InputError, match="regime_weights"):
        TrainConfig(stages=stages, regime_weights=weights)


def test_mask_only_weights_draw_only_mask_clips():
    spec = ClipSpec(image_size=256, frames=2, regime_weights=(0.0, 1.0, 0.0))
    drawn = [draw_clip(seed, spec) for seed in range(TRAIN_SEEDS.start, TRAIN_SEEDS.start + 6)]
    assert {c.regime for c in drawn if c is not None} == {"mask"}
