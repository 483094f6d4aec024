"""benchmarks.gpu_check: the one GPU check runs end to end (on the CPU here, at its smoke size)
and refuses, saying why, a host that lacks what it measures."""

from __future__ import annotations

import json
import sys

import pytest

torch = pytest.importorskip("torch", reason="the check runs the torch backend "
                            "(pip install '.[export]')")

from benchmarks import gpu_check  # noqa: E402


def test_the_check_runs_its_code_on_the_cpu_and_writes_one_record(tmp_path):
    path = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--smoke", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    cases = {c["case"]: c for c in record["cases"]}
    tracked = [f"micro@256/1r/{p}/{profile}" for p in ("fp32", "fp16")
               for profile in ("exact", "fast")]
    assert set(tracked) <= set(cases)
    for name in tracked:
        case = cases[name]
        assert case["baseline"] == "sam2-predictor" and case["median_ms"] > 0
        # the trained demo SAM2 finds its segment (Dice against exact truth), autocast fp16
        # included
        assert case["task"]["dice_ge2mm"] > 0.4, (name, case["task"])
    assert cases["micro@256/1r/fp16/exact"]["fidelity"]["iou_vs_fp32_mean"] > 0.95
    decoder = cases["vlm-decoder/smoke/float32"]
    assert decoder["per_token_median_ms"] > 0 and decoder["tokens"] == 3
    assert record["check_versions"]["torch"] == torch.__version__
    assert record["device"]["gpu"] is None


def test_a_host_without_cuda_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--json", str(tmp_path / "never.json")]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()


def test_a_missing_sam2_is_named_with_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sam2", None)  # import sam2 raises ImportError
    assert gpu_check.main(["--device", "cpu", "--smoke"]) == 2
    err = capsys.readouterr().err
    assert "sam2 does not import" in err and "pip install sam2==1.1.0" in err
