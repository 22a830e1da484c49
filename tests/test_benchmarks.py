"""The benchmark scripts still run: each parses its flags after importing what it uses, and the
cheap ones run end to end at their smallest settings, printing their provenance and a table.
(Their numbers are measured by running them, never here.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(  # the scripts (record.py and conditioned.py are modules they import)
    p.name for p in (ROOT / "benchmarks").glob("*.py") if "__main__" in p.read_text()
)


def run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_benchmark_imports_and_parses_its_flags(script):
    assert "usage:" in run(f"benchmarks/{script}", "--help")


@pytest.mark.parametrize(
    "script, flags, row",
    [
        (
            "per_sample.py",
            ["--rounds=1", "--batch=4"],
            r"\| torchhyper: per_sample \+ per_sample_call \| \d+ \| [\d.]+x \|",
        ),
        (
            "heads.py",
            [
                "--quick",
                "--downstreams=mlp-269k",
                "--heads=auto,dense",
                "--rounds=1",
                "--train-steps=2",
                "--memory-steps=1",
            ],
            r"\| auto \| HybridHead r=\d+ \|",
        ),
    ],
)
def test_the_cheap_benchmarks_run_end_to_end(script, flags, row):
    out = run(f"benchmarks/{script}", *flags)
    assert re.search(rf"- command: `python benchmarks/{script} ", out)
    assert re.search(r"- commit: \S+", out)
    assert re.search(row, out), out
    assert "nan" not in out.lower()
