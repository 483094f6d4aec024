"""Latency statistics, the run profile, the PNG charts, and loading a reference for a run."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import rau_rt
from rau_rt.errors import AnnotationError, InputError
from rau_rt.io import plots
from rau_rt.io.annotations import write_reference_annotation
from rau_rt.profiling import RunProfile, latency_stats, markdown_table
from rau_rt.reference import Reference
from rau_rt.types import FrameResult, Region


def test_latency_stats_by_hand():
    samples = np.arange(1, 101, dtype=float)  # 1..100 ms
    stats = latency_stats(samples[::-1], deadline_ms=90)  # order must not matter
    assert stats["count"] == 100 and stats["max"] == 100 and stats["mean"] == 50.5
    assert stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["jitter"] == pytest.approx(90.1 - 10.9)  # p90 - p10
    assert stats["tail"] == pytest.approx(100 - 95.05)  # max - p95
    assert stats["deadline_miss_rate"] == pytest.approx(0.10)  # 91..100 are late
    assert latency_stats([5.0, 5.0])["jitter"] == 0 and latency_stats([])["p50"] is None


def result(index, latency, stages):
    return FrameResult(index, index / 10, (4, 4), {}, stages, latency)


def test_run_profile_skips_warmup_and_tables_every_stage():
    profile = RunProfile()
    for i, latency in enumerate([500.0, 10.0, 12.0, 11.0]):
        profile.write(None, result(i, latency, {"encoder": latency / 2, "decoder": 1.0}))
    summary = profile.summary(deadline_ms=11.5, skip_first=1)
    assert summary["frames"] == 4 and summary["warmup_frames"] == 1
    assert summary["end_to_end"]["count"] == 3 and summary["end_to_end"]["max"] == 12.0
    assert summary["end_to_end"]["deadline_miss_rate"] == pytest.approx(1 / 3)
    assert summary["stages"]["encoder"]["max"] == 6.0
    table = markdown_table(summary)
    assert table.splitlines()[2].startswith("| end to end | 11.0 |")
    assert "| encoder |" in table and "33.3 % of frames missed it" in table
    assert json.loads(json.dumps(summary)) == summary  # JSON as it is
    assert profile.recent(2)["count"] == 2


def test_charts_are_pngs_and_reject_empty_series(tmp_path):
    path = plots.latency_plot(tmp_path / "latency.png", [0.0, 0.1, 0.2], [10.0, 30.0, 12.0],
                              deadline_ms=33.3)
    image = cv2.imread(str(path))
    assert image.shape == (plots.HEIGHT, plots.WIDTH, 3)
    assert (image == plots.DEADLINE).all(axis=2).any()  # the deadline line is drawn
    stages = {"encoder": {"p50": 5.0, "p99": 9.0}, "decoder": {"p50": 2.0, "p99": 3.0}}
    chart = cv2.imread(str(plots.stage_chart(tmp_path / "stages.png", stages)))
    bars = (chart == plots.LINE).all(axis=2)
    rows = np.flatnonzero(bars.any(axis=1))
    # two bars, the encoder's (p50 5) longer than the decoder's (p50 2)
    first, second = rows[rows < rows.mean()], rows[rows > rows.mean()]
    assert bars[first].sum(axis=1).max() > 2 * bars[second].sum(axis=1).max()
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(InputError):
        plots.latency_plot(tmp_path / "x.png", [], [])
    with pytest.raises(InputError):
        plots.stage_chart(tmp_path / "x.png", {"a": {"p50": None, "p99": None}})


def test_load_reference_reads_json_and_image(tmp_path):
    image = np.zeros((40, 60), np.uint16)
    image[10:20, 10:30] = 4095  # 12-bit
    cv2.imwrite(str(tmp_path / "ref.png"), image)
    region = Region("6", (10, 10, 30, 20), ((10, 10), (29, 10), (29, 19), (10, 19)))
    write_reference_annotation(tmp_path / "ref.json", "ref.png", (60, 40), [region])
    reference = rau_rt.load_reference(tmp_path / "ref.json")
    assert reference.image.dtype == np.uint8 and reference.image.max() == 255
    assert reference.region_names == ("6",) and reference.name == "ref"
    mask = reference.mask(reference.regions[0])
    assert mask.shape == (40, 60) and mask[10:20, 10:30].all() and mask.sum() == 200
    write_reference_annotation(tmp_path / "wrong.json", "ref.png", (64, 40), [region])
    with pytest.raises(AnnotationError, match="image_size"):
        rau_rt.load_reference(tmp_path / "wrong.json")
    write_reference_annotation(tmp_path / "gone.json", "missing.png", (60, 40), [region])
    with pytest.raises(AnnotationError, match="missing"):
        rau_rt.load_reference(tmp_path / "gone.json")


def test_reference_mask_prefers_the_mask_and_skips_box_only_regions():
    image = np.zeros((20, 20), np.uint8)
    own = np.zeros((20, 20), bool)
    own[2:4, 2:4] = True
    reference = Reference(image, (Region("m", mask=own, polygon=((0, 0), (19, 0), (19, 19))),
                                  Region("b", (1, 1, 5, 5))))
    assert reference.mask(reference.regions[0]).sum() == 4
    assert reference.mask(reference.regions[1]) is None


def test_a_long_run_keeps_flat_memory_and_close_statistics():
    from rau_rt.profiling import HISTOGRAM_RELATIVE_ERROR, LatencySeries

    rng = np.random.default_rng(1)
    values = np.concatenate([[900.0, 800.0], rng.lognormal(3.0, 0.4, 20_000)])
    series = LatencySeries(keep=1000)
    for v in values:
        series.add(float(v))
    assert not series.exact and series._ring.size == 1000  # bounded, whatever the length
    np.testing.assert_array_equal(series.last(), values[-1000:])
    np.testing.assert_array_equal(series.last(3), values[-3:])
    got = series.stats(deadline_ms=30.0, skip_first=2)  # warm-up left out, as on the exact path
    want = latency_stats(values[2:], deadline_ms=30.0)
    assert got["count"] == want["count"] == 20_000
    assert got["max"] == want["max"] and got["mean"] == pytest.approx(want["mean"], rel=1e-9)
    assert got["std"] == pytest.approx(want["std"], rel=0.01)
    for key in ("p50", "p90", "p99"):
        assert got[key] == pytest.approx(want[key], rel=2 * HISTOGRAM_RELATIVE_ERROR)
    assert got["deadline_miss_rate"] == pytest.approx(want["deadline_miss_rate"], abs=0.01)
    assert latency_stats(values[:2])["max"] == 900.0 and got["max"] < 800.0


def test_run_profile_says_when_its_statistics_come_from_histograms():
    profile = RunProfile(keep=1000)
    for i in range(1500):
        profile.write(None, result(i, 10.0 + i % 7, {"encoder": 5.0}))
    summary = profile.summary(deadline_ms=15.0)
    assert summary["frames"] == 1500 and "histogram over all 1500 frames" in summary["statistics"]
    assert len(profile.latency_ms) == 1000 and profile.indices[0] == 500
    assert summary["stages"]["encoder"]["p50"] == pytest.approx(5.0, rel=0.01)
    short = RunProfile()
    short.write(None, result(0, 10.0, {}))
    assert "statistics" not in short.summary()


def test_a_spawned_process_reports_its_own_peak_rss_not_its_parents():
    import subprocess
    import sys

    from rau_rt.profiling import peak_rss_mib

    held = np.ones(400 << 20, np.uint8)  # 400 MiB resident in this process
    assert peak_rss_mib() >= 400
    child = subprocess.run([sys.executable, "-c", "from rau_rt.profiling import peak_rss_mib; "
                            "print(peak_rss_mib())"], capture_output=True, text=True, check=True)
    assert float(child.stdout) < 300  # ru_maxrss would carry this process's 400+ MiB over
    del held


def test_the_peak_rss_starts_over_from_the_current_rss():
    from rau_rt.profiling import peak_rss_mib, reset_peak_rss

    held = np.ones(300 << 20, np.uint8)  # 300 MiB resident, then handed back
    del held
    before = peak_rss_mib()
    assert reset_peak_rss()  # Linux (CI): /proc/self/clear_refs takes "5"
    assert peak_rss_mib() < before - 200
