"""Tests of examples/text_adapters.py: the task family and its descriptions, the word tokenizer,
embeddings that tell every description apart, a smoke run (outputs written, the exported adapter
read back by PEFT) and a small run in which the adapters generated from held-out descriptions
beat the base model."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from _examples import load_example

pytest.importorskip("matplotlib")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("tqdm")

import torch  # noqa: E402


def load():
    return load_example("text_adapters")


def test_tasks_follow_their_descriptions():
    example = load()
    assert example.TASKS.shape == (256, 4)
    texts = [example.describe(t) for t in example.TASKS]
    assert len(set(texts)) == 256
    assert example.describe(torch.tensor([3, 1, 4, 2])) == (
        "red tokens add three , green tokens add one , blue tokens add four , gold tokens add two"
    )
    tasks = example.TASKS[[0, 100, 255]]
    x = example.sample(tasks, 50, 8, torch.Generator().manual_seed(0))
    assert x.shape == (3, 50, 8) and 0 <= x.min() and x.max() < example.P
    step = tasks[:, None, None, :].expand(-1, 50, 7, -1).gather(-1, x[..., :-1, None] % 4)[..., 0]
    follows = (x[..., 1:] == (x[..., :-1] + step) % example.P).float().mean().item()
    assert 0.85 < follows < 0.97  # 0.1 of the tokens are uniformly random


def test_word_tokenizer_pads_like_a_transformers_tokenizer():
    tokenizer = load().WordTokenizer(["b a", "a c"])
    assert list(tokenizer.vocab) == ["[PAD]", "[CLS]", "[UNK]", "a", "b", "c"]
    batch = tokenizer(["a b c", "c zebra"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[1, 3, 4, 5], [1, 5, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_the_frozen_encoder_tells_every_description_apart():
    """Descriptions that differ only in the order of their steps embed apart too."""
    example = load()
    texts = [example.describe(t) for t in example.TASKS]
    tokenizer = example.WordTokenizer(texts)
    encoder = example.build_encoder(tokenizer)
    assert not any(p.requires_grad for p in encoder.parameters())
    raw = example.embed(encoder, tokenizer, texts)
    assert raw.shape == (256, 128)
    features = (raw - raw.mean(0)) / raw.std(0)
    distance = torch.cdist(features, features)
    median = distance[~torch.eye(256, dtype=torch.bool)].median()
    swapped = [i for i, t in enumerate(example.TASKS.tolist()) if t == [2, 1, 1, 1]]
    one_first = [i for i, t in enumerate(example.TASKS.tolist()) if t == [1, 2, 1, 1]]
    assert distance[swapped[0], one_first[0]] > 0.1 * median
    assert torch.pdist(features).min() > 0.1 * median  # 0.26 at seed 0


def test_smoke_run_writes_plot_metrics_and_a_peft_adapter(tmp_path):
    metrics = load().main(["--smoke", f"--out={tmp_path}"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["out"] == str(tmp_path) and saved["config"]["rank"] == 8
    assert not (tmp_path / "metrics.json.tmp").exists()
    png = (tmp_path / "text_adapters.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR chunk
    assert width >= 1000 and height >= 400
    assert set(metrics["held_out"]) == {"base model", "direct LoRA", "generated (text)"}
    for result in metrics["held_out"].values():
        assert math.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
    steps = [step for step, _ in metrics["held_out_curve_seed0"]]
    assert steps[0] == 0 and steps[-1] == 4
    export = saved["export"]
    assert export["max_abs_diff"] <= 1e-5 and export["max_abs_change_from_base"] > 0
    folder = Path(export["folder"])
    assert folder == tmp_path / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["fan_in_fan_out"]
    assert set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
    assert (folder / "adapter_model.safetensors").is_file()


def test_generated_adapters_beat_the_base_model_on_held_out_descriptions(tmp_path):
    """A small run (one seed, short pretraining and hypernetwork training): the adapters
    generated from held-out descriptions lower the base model's loss, and differ from one
    description to another."""
    metrics = load().main(
        [
            "--pretrain_steps=150", "--steps=250", "--lora_steps=10", "--width=32",
            "--batch=64", "--held_out=8", "--eval_queries=16", "--tasks_per_step=8",
            "--queries=4", "--length=10", "--eval_every=50", f"--out={tmp_path}",
        ]
    )  # fmt: skip
    held = metrics["held_out"]
    generated, base = held["generated (text)"]["loss"], held["base model"]["loss"]
    assert generated < base - 0.2, (generated, base)  # 0.38-0.39 below it on seeds 0-2
    assert metrics["generated_beats_base"]
    assert metrics["adapter_min_distance_over_norm"] > 0.2  # 0.58-0.81 on seeds 0-2
    assert metrics["export"]["max_abs_diff"] <= 1e-5
