"""Smoke tests of the conditioning examples: tiny settings, each writes its plot and metrics."""

from __future__ import annotations

import json
import math

import pytest
from _examples import load_example

pytest.importorskip("matplotlib")


@pytest.mark.parametrize(
    ("name", "argv", "plot"),
    [
        (
            "set_pooling",
            ["--steps=3", "--tasks=2", "--context=4", "--queries=5"],
            "set_pooling.png",
        ),
        ("per_sample", ["--steps=3", "--batch=8"], "per_sample.png"),
        ("continual", ["--steps=3"], "continual.png"),
    ],
)
def test_example_runs(name, argv, plot, tmp_path):
    metrics = load_example(name).main([*argv, f"--out={tmp_path}"])
    assert (tmp_path / plot).stat().st_size > 10_000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["out"] == str(tmp_path)
    numbers = [v for v in _leaves(metrics) if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value
