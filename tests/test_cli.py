"""`rau-rt --version` and `rau-rt doctor` (table and --json), including hosts with broken parts."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import rau_rt
from rau_rt import cli, doctor


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rau-rt {rau_rt.__version__}"


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "doctor" in capsys.readouterr().err


def test_doctor_json_reports_every_component(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    components = report["components"]
    for name in ("rau-rt", "python", "numpy", "opencv", "onnxruntime", "torch", "tensorrt", "gpu",
                 "native", "cpu", "localizer-server"):
        assert components[name]["status"] in ("ok", "missing", "warn", "error"), name
    assert report["native"] is rau_rt.ops.native_available()
    assert components["native"]["built"] is report["native"]
    assert "CPUExecutionProvider" in components["onnxruntime"]["providers"]
    assert set(components["cpu"]["flags"]) >= {"avx2"} or set(components["cpu"]["flags"]) >= {
        "asimd"}


def test_doctor_table_has_one_row_per_probe(capsys):
    assert cli.main(["doctor"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(doctor.PROBES)
    assert lines[0].split()[:2] == ["rau-rt", "ok"]


def test_doctor_turns_a_crashing_probe_into_an_error_row(monkeypatch):
    def probe_torch():
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(doctor, "PROBES", (doctor.probe_rau_rt, probe_torch))
    rows = doctor.collect()
    assert [(r.component, r.status) for r in rows] == [("rau-rt", "ok"), ("torch", "error")]
    assert "libcudart" in rows[1].detail


def test_doctor_reports_a_missing_package_as_a_row(monkeypatch):
    real_import = doctor._import
    monkeypatch.setattr(doctor, "_import",
                        lambda name: None if name == "cv2" else real_import(name))
    row = doctor.probe_opencv()
    assert row.status == "missing" and "opencv-python-headless" in row.detail


def test_doctor_says_how_to_get_the_central_localizer(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./.venv-server here
    monkeypatch.delenv("RAU_RT_SERVER_ENV", raising=False)
    versions = {"tritonclient": "2.73.0"}
    monkeypatch.setattr(doctor, "_dist_version", versions.get)
    row = doctor.probe_serving()
    assert row.status == "ok" and "--make-env .venv-server" in row.detail
    versions.clear()
    row = doctor.probe_serving()
    assert row.status == "missing" and "pip install '.[remote]'" in row.detail


def test_doctor_flags_both_onnxruntime_wheels(monkeypatch):
    versions = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}
    monkeypatch.setattr(doctor, "_dist_version", versions.get)
    row = doctor.probe_onnxruntime()
    assert row.status == "warn" and "pip uninstall -y onnxruntime onnxruntime-gpu" in row.detail


def test_console_script_runs_doctor():
    exe = shutil.which("rau-rt")
    assert exe is not None, "the rau-rt console script is not installed"
    result = subprocess.run([exe, "doctor", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["rau_rt"] == rau_rt.__version__
