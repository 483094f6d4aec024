"""The README's commands and quickstart are the ones CI runs and tests execute (STYLE.md, Tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^<!-- {re.escape(marker)} -->\n```\w*\n(.*?)^```", text, re.S | re.M)
    assert match is not None, f"README.md has no block after <!-- {marker} -->"
    return match.group(1)


def test_ci_runs_the_readme_commands():
    ci = subprocess.run(["bash", "-c", "source <(sed -n '/^readme_block()/,/^}/p' .ci/run); "
                        "readme_block install; echo ---; readme_block test"],
                        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    install, test = ci.split("---\n")
    assert install == readme_block("ci:install")
    assert test == readme_block("ci:test")
    assert "pip install" in install and "rau-rt" in install
    assert "pytest" in test


def test_quickstart_runs():
    code = readme_block("test:quickstart")
    assert len(code.strip().splitlines()) <= 10
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert result.stdout.startswith("(3, 512, 512) float32")


def test_performance_tables_are_the_recorded_results():
    from benchmarks import report

    text = (ROOT / "README.md").read_text()
    block = text[text.index(report.BEGIN) + len(report.BEGIN):text.index(report.END)]
    assert block.strip() == report.render().strip(), (
        "README performance tables differ from benchmarks/results/: "
        "run python -m benchmarks.report --readme")
    assert "speedup" in block
