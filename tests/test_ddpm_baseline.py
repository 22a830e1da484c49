"""The DDPM experiment's second direct baseline: one UNet with a class embedding, trained on the
trainer's own draws; its metrics, parameter counts and step times; exact resume with it."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="needs diffusers"
)

from test_experiments import TINY as SMOKE  # noqa: E402

from experiments import train as trainer  # noqa: E402
from experiments.common.class_ddpm import class_ddpm, class_loss, train_class_ddpm  # noqa: E402
from experiments.config import load_run  # noqa: E402
from experiments.experiment import build_task, experiment_of  # noqa: E402

# The smoke config of tests/test_experiments.py, with a checkpoint to resume from and fewer
# timed steps (a later --key=value wins).
TINY = [*SMOKE["ddpm"], "--steps=4", "--checkpoint_every=2", "--task.timing_steps=2"]
# What differs between two runs of one config: the clock.
TIMED = {"class_unet_train_seconds", "step_ms_hypernetwork", "step_ms_direct", "step_ms_class_unet"}


def run(out: Path, *extra: str) -> dict:
    return trainer.main(["ddpm", f"--out_dir={out}", *TINY, *extra])


def test_class_ddpm_is_the_downstream_plus_a_class_embedding_and_it_learns():
    config = load_run("ddpm", ["--out_dir=unused", *TINY, "--steps=3", "--direct_lr=0.01"])
    task = build_task(config, torch.device("cpu"))
    model = class_ddpm(task)  # torchhyper.zoo.DDPM(num_classes=10), not a second trainer
    assert type(model) is type(task.downstream) and model.num_classes == 10
    expected = {k: v for k, v in task.downstream.unet.config.items() if not k.startswith("_")}
    assert {**expected, "num_class_embeds": 10} == {
        k: v for k, v in model.unet.config.items() if not k.startswith("_")
    }
    # It starts where the direct UNets start (copies of the downstream), but for its embedding.
    template = task.downstream.state_dict()
    state = model.state_dict()
    assert set(state) - set(template) == {"unet.class_embedding.weight"}
    assert all(torch.equal(template[k], state[k]) for k in template)
    assert state["unet.class_embedding.weight"].shape == (10, 4 * 8)

    # Gradients reach the embedding rows of the classes in the batch, and only those.
    batch = [(1, task.sets.train(1)[:4]), (7, task.sets.train(7)[:4])]
    class_loss(model, batch).backward()
    embedding = model.unet.class_embedding.weight
    assert embedding.grad[1].abs().sum() > 0 and embedding.grad[7].abs().sum() > 0
    assert embedding.grad[[0, 2, 3, 4, 5, 6, 8, 9]].abs().sum() == 0
    model.zero_grad(set_to_none=True)

    before = embedding.detach().clone()
    losses = train_class_ddpm(task, model)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    drawn = set()
    generator = torch.Generator().manual_seed(config.seed)  # the trainer's draws, replayed
    for _ in range(config.steps * config.sets_per_step):
        drawn.add(task.sample(generator)[0])
    moved = (embedding.detach() - before).abs().sum(1) > 0
    assert {k for k in range(10) if moved[k]} == drawn


def test_metrics_same_batches_and_exact_resume(tmp_path, monkeypatch):
    task_type = type(build_task(load_run("ddpm", ["--out_dir=unused", *TINY]), torch.device("cpu")))
    drawn = []
    sample = task_type.sample

    def recording(self, generator):
        k, batch = sample(self, generator)
        drawn.append((k, batch.clone()))
        return k, batch

    monkeypatch.setattr(task_type, "sample", recording)
    metrics = run(tmp_path / "straight")
    monkeypatch.setattr(task_type, "sample", sample)
    # The class UNet trained on the very sets the trainer drew, in the same order.
    n = 4 * 2  # steps * sets_per_step
    assert len(drawn) >= 2 * n
    for (k, a), (j, b) in zip(drawn[:n], drawn[n : 2 * n]):
        assert k == j and torch.equal(a, b)

    saved = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for name in ("hypernetwork", "direct", "class_unet"):
        assert saved[f"fd_{name}"] >= 0 and 0 <= saved[f"class_fraction_{name}"] <= 1
        assert len(saved[f"class_fraction_per_class_{name}"]) == 10
        assert saved[f"step_ms_{name}"] > 0
    unet = sum(
        p.numel()
        for p in build_task(
            load_run("ddpm", ["--out_dir=u", *TINY]), torch.device("cpu")
        ).downstream.parameters()
    )
    assert saved["parameters_direct"] == 10 * unet
    assert saved["parameters_class_unet"] == unet + 10 * 4 * 8  # + 10 class embeddings
    assert saved["parameters_hypernetwork"] == saved["hypernetwork_model"]["parameters"]
    better = min(("direct", "class_unet"), key=lambda k: saved[f"fd_{k}"])
    assert saved["better_direct"] == better
    assert saved["within_10_percent"] == (saved["fd_hypernetwork"] <= 1.1 * saved[f"fd_{better}"])
    row = experiment_of("ddpm").row(saved)
    assert "one UNet + class embedding" in row[3] and "ms/step" in row[2]
    assert (tmp_path / "straight" / "ddpm.png").stat().st_size > 1000

    # Stopped after the checkpoint at step 2 and resumed: the same models, the same metrics.
    calls = {"n": 0}
    step = trainer.train_step

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(trainer, "train_step", step)
    resumed = run(tmp_path / "resumed", "--resume=true")
    a, b = (
        torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["models"]
        for d in ("straight", "resumed")
    )
    for model in ("hypernetwork", "direct"):
        assert a[model].keys() == b[model].keys()
        assert all(torch.equal(v, b[model][k]) for k, v in a[model].items())
    untimed = [{k: v for k, v in m.items() if k not in TIMED} for m in (metrics, resumed)]
    assert untimed[0] == untimed[1]


def test_verdict_compares_with_the_better_direct_baseline():
    verdict = experiment_of("ddpm").verdict
    base = {
        "amortized": True,
        "fd_hypernetwork": 1.8,
        "fd_direct": 3.0,
        "fd_class_unet": 1.7,
        "better_direct": "class_unet",
        "class_fraction_hypernetwork": 0.99,
    }
    assert verdict({**base, "within_10_percent": True}).startswith("yes")
    assert "FD: **no**" in verdict({**base, "within_10_percent": False})
    low = verdict({**base, "within_10_percent": True, "class_fraction_hypernetwork": 0.9})
    assert "class share >= 95%: **no**" in low
