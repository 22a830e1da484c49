"""Smoke test of examples/task_adapters.py: tiny sizes, every method runs, outputs are written."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("tqdm")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "task_adapters.py"


def load():
    spec = importlib.util.spec_from_file_location("example_task_adapters", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_family_follows_its_rule():
    example = load()
    import torch

    gen = torch.Generator().manual_seed(0)
    tasks = example.random_tasks(3, gen)
    assert tasks.shape == (3, example.P)
    x = example.sample(tasks, 50, 6, gen)
    want = example.SUCCESSORS[
        x[..., :-1],
        tasks[:, None, None, :].expand(-1, 50, 5, -1).gather(-1, x[..., :-1, None])[..., 0],
    ]
    follows = (x[..., 1:] == want).float().mean().item()
    assert 0.85 < follows < 0.97  # 0.1 of the tokens are uniformly random
    assert example.pairs(x).shape == (3, 50 * 5, 2 * example.P)


def test_quick_run_writes_metrics_and_plot(tmp_path):
    metrics = load().main(["--quick", f"--out={tmp_path}"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["out"] == str(tmp_path)
    assert not (tmp_path / "metrics.json.tmp").exists()
    assert (tmp_path / "task_adapters.png").stat().st_size > 10_000
    held = {"base model", "per-task LoRA", "per-task LoRA, K demos", "generated (set)"}
    assert set(metrics["held_out"]) == held
    assert {"task id, base=learned", "task id, base=none"} <= set(metrics["train_tasks"])
    for split in ("held_out", "train_tasks"):
        for result in metrics[split].values():
            assert math.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
