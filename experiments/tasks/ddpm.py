r"""DDPM: a hypernetwork reads a set of digits and generates every weight of a diffusion model's
UNet (diffusers' ``UNet2DModel`` with its ``DDPMScheduler``).

Amortized (the README's run): each digit class is a dataset; the hypernetwork generates one UNet
per class from that class's training images, i.e. it is conditioned on the class through the
set. One UNet per class is trained directly on the same sets (same total steps). Single
dataset: all training digits.

Judged by a classifier trained here on the training split: the Fréchet distance (FD) between
its features of generated samples and of held-out real digits (lower is better), and, per
class, the fraction of samples it assigns to the class they were generated for. The FD of the
real training digits to the held-out ones, and the classifier's held-out accuracy, are the
references ("truth").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from experiments.config import check_positive, check_sizes
from experiments.experiment import Experiment, number, percent
from experiments.tasks.base import History, Task, plot_losses, within
from experiments.tasks.digits import DigitsConfig, DigitSets
from experiments.tasks.judge import DigitClassifier, frechet_distance
from torchhyper import bind
from torchhyper.zoo import DDPM

if TYPE_CHECKING:
    from experiments.config import Config

__all__ = ["EXPERIMENT", "DDPMConfig", "DDPMTask"]


@dataclass
class DDPMConfig(DigitsConfig):
    r"""A DDPM (diffusers' UNet2DModel and DDPMScheduler) on digits, judged by a classifier."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    timesteps: int = 1000
    sample_steps: int = 100  # reverse steps when sampling
    samples_per_class: int = 100
    classifier_steps: int = 1500

    def validate(self, where: str) -> None:
        super().validate(where)
        check_sizes(where, "block_out_channels", self.block_out_channels)
        check_positive(
            where,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            timesteps=self.timesteps,
            sample_steps=self.sample_steps,
            samples_per_class=self.samples_per_class,
            classifier_steps=self.classifier_steps,
        )
        if self.sample_steps > self.timesteps:
            raise ValueError(
                f"{where}.sample_steps ({self.sample_steps}) must be <= timesteps "
                f"({self.timesteps})"
            )


class DDPMTask(Task):
    downstream: DDPM

    def __init__(self, config: Config, device: torch.device) -> None:
        t = config.task
        self.config, self.t, self.device = config, t, device
        self.sets = DigitSets(config, lambda x: 2 * x - 1)
        self.downstream = DDPM(
            self.sets.images.size,
            block_out_channels=t.block_out_channels,
            layers_per_block=t.layers_per_block,
            norm_num_groups=t.norm_num_groups,
            num_train_timesteps=t.timesteps,
        )
        self.downstream.to(device).requires_grad_(False)
        self.input_dim = self.sets.x_train[0].numel()
        self.num_datasets = len(self.sets)

    def sample(self, generator: torch.Generator) -> tuple[int, Tensor]:
        k, batch = self.sets.sample(generator)
        return k, batch.to(self.device)

    def loss(self, params: dict[str, Tensor], batch: Tensor) -> Tensor:
        losses: Tensor = functional_call(self.downstream, params, (batch,))
        return losses.mean()

    def evaluate(
        self, hypernetwork: nn.Module, direct: nn.ModuleList, history: History, out: Path
    ) -> dict[str, Any]:
        images = self.sets.images
        judge = DigitClassifier.fit(
            self.sets.x_train, images.y_train, steps=self.t.classifier_steps, seed=self.config.seed
        )
        real_test = judge.features(self.sets.x_test)
        n = self.t.samples_per_class * (1 if len(self.sets) > 1 else 10)
        samples: dict[str, list[Tensor]] = {"hypernetwork": [], "direct": []}
        gen = torch.Generator(self.device).manual_seed(self.config.seed + 2000)
        jobs = [(k, name) for k in range(len(self.sets)) for name in samples]
        for k, name in tqdm(jobs, desc="sampling", dynamic_ncols=True, mininterval=1.0):
            with torch.no_grad():
                params = (
                    hypernetwork(self.sets.train(k).to(self.device))
                    if name == "hypernetwork"
                    else dict(direct[k].named_parameters())
                )
            with bind(self.downstream, params):
                samples[name].append(
                    self.downstream.sample(n, steps=self.t.sample_steps, generator=gen).cpu()
                )
        metrics: dict[str, Any] = {
            "fd_truth": frechet_distance(judge.features(self.sets.x_train), real_test),
            "classifier_test_accuracy": (judge(self.sets.x_test).argmax(1) == images.y_test)
            .float()
            .mean()
            .item(),
        }
        for name, per_set in samples.items():
            metrics[f"fd_{name}"] = frechet_distance(judge.features(torch.cat(per_set)), real_test)
            if len(self.sets) > 1:
                hits = [
                    (judge(x).argmax(1) == c).float().mean().item()
                    for c, x in zip(self.sets.classes, per_set)
                ]
                metrics[f"class_fraction_{name}"] = sum(hits) / len(hits)
                metrics[f"class_fraction_per_class_{name}"] = hits
        metrics["within_10_percent"] = within(metrics["fd_hypernetwork"], metrics["fd_direct"])
        metrics["samples"] = sum(len(x) for x in samples["direct"])
        self._plot(samples, history, out / "ddpm.png")
        return metrics

    def _plot(self, samples: Any, history: History, path: Path) -> None:
        side = self.sets.images.size
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
        real = [self.sets.test(k)[:10] for k in range(len(self.sets))]
        panels = {
            "hypernetwork": [x[:10] for x in samples["hypernetwork"]],
            "direct": [x[:10] for x in samples["direct"]],
            "real (held-out)": real,
        }
        for ax, (name, rows) in zip(axes, panels.items()):
            x = torch.cat(rows)[:100]
            x = x[: len(x) // 10 * 10].reshape(-1, 10, side, side)
            ax.imshow(
                x.permute(0, 2, 1, 3).reshape(-1, 10 * side),
                cmap="gray_r",
                vmin=-1,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_title(name + (" (row = class)" if len(rows) > 1 else ""), fontsize=9)
            ax.axis("off")
        plot_losses(axes[-1], history, ylabel="denoising loss")
        fig.tight_layout()
        fig.savefig(path, dpi=self.config.plot_dpi)
        plt.close(fig)


def _row(m: dict[str, Any]) -> list[str]:
    fraction = "class_fraction_hypernetwork" in m  # amortized: conditioned on a class

    def cell(name: str) -> str:
        return number(m[f"fd_{name}"]) + (
            f" / {percent(m[f'class_fraction_{name}'])}" if fraction else ""
        )

    return [
        "DDPM (diffusers UNet2DModel + DDPMScheduler)"
        + (", each digit class a set" if m["amortized"] else ", all training digits"),
        "Fréchet distance in a digits classifier's features (lower is better)"
        + (" / fraction of samples of the conditioned class" if fraction else ""),
        cell("hypernetwork"),
        cell("direct") + (" (one UNet per class)" if m["amortized"] else ""),
        f"real train vs held-out: {number(m['fd_truth'])} / classifier accuracy "
        f"{percent(m['classifier_test_accuracy'])}",
    ]


def _verdict(m: dict[str, Any]) -> str:
    ok = m["within_10_percent"]
    if (
        "class_fraction_hypernetwork" in m
        and m["class_fraction_hypernetwork"] < 0.9 * m["class_fraction_direct"]
    ):
        return "FD: yes; class fraction: **no** (see below)" if ok else "**no** (see below)"
    return "yes" if ok else "**no** (see below)"


EXPERIMENT = Experiment(
    name="ddpm",
    config=DDPMConfig,
    task=DDPMTask,
    order=3,
    row=_row,
    verdict=_verdict,
    runs={
        "ddpm": {
            "threads": 1,
            "amortized": True,
            "steps": 3000,
            "batch_size": 32,
            "sets_per_step": 2,
            "hidden_sizes": [32, 64, 96],
            "lr": 0.001,
            "direct_lr": 0.001,
            "checkpoint_every": 500,
            "task": {
                "dataset": "digits",
                "block_out_channels": [16, 32],
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "timesteps": 1000,
                "sample_steps": 100,
                "samples_per_class": 100,
                "classifier_steps": 1500,
            },
        }
    },
)
