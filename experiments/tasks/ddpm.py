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

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from experiments.config import Config
from experiments.tasks.base import Task, plot_losses, within
from experiments.tasks.digits import DigitSets
from experiments.tasks.judge import DigitClassifier, frechet_distance
from torchhyper import bind
from torchhyper.zoo import DDPM

__all__ = ["DDPMExperiment"]


class DDPMExperiment(Task):
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
        return functional_call(self.downstream, params, (batch,)).mean()

    def evaluate(self, hypernetwork, direct: nn.ModuleList, history, out: Path) -> dict[str, Any]:
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

    def _plot(self, samples, history, path: Path) -> None:
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
