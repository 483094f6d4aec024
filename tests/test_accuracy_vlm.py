"""The `localizer` suite of `benchmarks.bench_accuracy` on weights a short run leaves (the tiny
size, two steps): the run's fp16 weights restore into the Hugging Face folder they fit, export
with aspect buckets at every precision, and each case scores held-out pairs through the
runtime's Localizer; constrained answers always name every region asked."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the trainer and exporter need the export extra")

from benchmarks import accuracy_vlm
from rau_rt.errors import InputError


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from rau_rt.train.vlm_trainer import WEIGHTS_FILE, VlmTrainConfig, train

    out = tmp_path_factory.mktemp("vlm-run")
    train(VlmTrainConfig(size="tiny", input_size=224, steps=2, validate_every=2,
                         validation_pairs=1, warmup=1), out)
    return out / WEIGHTS_FILE


def test_the_localizer_suite_scores_every_precision(weights, tmp_path):
    cases, facts = accuracy_vlm.localizer_suite(weights, 3, tmp_path,
                                                precisions=("fp32", "int4"))
    assert [c["case"] for c in cases] == ["localizer/tiny/fp32", "localizer/tiny/int4"]
    for case in cases:
        task = case["task"]
        assert task["queries"] == facts["pairs"] == 3
        assert task["parse_rate"] == 1.0  # the grammar names every region, in order
        assert 0.0 <= task["presence_f1"] <= 1.0 and 0.0 <= (task["hit_rate"] or 0.0) <= 1.0
        assert case["median_ms"] > 0
    assert "answer_equal_to_fp32" in cases[1]["fidelity"]
    assert "| localizer/tiny/int4 |" in accuracy_vlm.summary({"cases": cases})


def test_restore_refuses_weights_of_another_model(tmp_path):
    import torch
    from safetensors.torch import save_file

    from rau_rt.train.vlm_trainer import restore

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"model": "sam2"})
    with pytest.raises(InputError, match="rau-rt train vlm"):
        restore(other, tmp_path / "folder")
    with pytest.raises(InputError, match="no such"):
        restore(tmp_path / "missing.safetensors", tmp_path / "folder")
