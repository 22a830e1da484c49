"""Tests of examples/task_adapters.py: the task family, the bigram encoding of demonstrations, a
smoke run (every method runs, outputs are written) and a small run in which the generated
adapters beat the base model on held-out tasks."""

from __future__ import annotations

import json
import math

import pytest
from _examples import load_example

pytest.importorskip("matplotlib")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("tqdm")


def load():
    return load_example("task_adapters")


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


def test_bigrams_sum_to_the_counts_of_the_demonstrations():
    example = load()
    import torch

    P = example.P
    demos = example.sample(example.random_tasks(2, torch.Generator().manual_seed(1)), 3, 7,
                           torch.Generator().manual_seed(2))  # fmt: skip
    encoded = example.bigrams(demos)
    assert encoded.shape == (2, 3 * 6, P * P)
    assert (encoded.sum(-1) == 1).all()  # one bigram per transition
    counts = torch.zeros(2, P, P)
    for s in range(2):
        for seq in demos[s]:
            for a, b in zip(seq[:-1], seq[1:]):
                counts[s, a, b] += 1
    assert torch.equal(encoded.sum(1).view(2, P, P), counts)


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


def test_generated_adapters_beat_the_base_model(tmp_path):
    """A small run (one seed, a short pretraining and hypernetwork training): the adapters
    generated for held-out tasks from their demonstrations lower the base model's loss."""
    metrics = load().main(
        [
            "--seeds=1", "--pretrain_steps=150", "--steps=150", "--lora_steps=10",
            "--id_steps=2", "--width=32", "--batch=64", "--held_out=8", "--eval_queries=16",
            "--tasks_per_step=8", "--queries=4", "--train_tasks=512", "--id_tasks=16",
            f"--out={tmp_path}",
        ]
    )  # fmt: skip
    held = metrics["held_out"]
    generated, base = held["generated (set)"]["loss"], held["base model"]["loss"]
    assert generated < base - 0.1, (generated, base)  # 0.22-0.26 below it on seeds 0-2
    assert metrics["generated_beats_base"]
    assert math.isfinite(metrics["generated_over_lora_loss_median"])
