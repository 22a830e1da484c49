r"""VAE: a hypernetwork reads a set of binarized digits and generates a VAE for them.

Single dataset: all training digits. Amortized: each digit class is a dataset; the hypernetwork
generates one VAE per class from that class's training images, and one VAE per class is trained
directly on the same sets (so the same total number of steps). Metric: the ELBO of held-out
(test) digits, in nats per image (higher is better), averaged over ``elbo_samples`` draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.func import functional_call

from experiments.config import check_positive, check_sizes
from experiments.experiment import Experiment, number
from experiments.tasks.base import History, Task, plot_losses, within
from experiments.tasks.digits import DigitsConfig, DigitSets
from torchhyper import bind
from torchhyper.zoo import VAE

if TYPE_CHECKING:
    from experiments.config import Config

__all__ = ["EXPERIMENT", "VAEConfig", "VAETask"]


@dataclass
class VAEConfig(DigitsConfig):
    r"""A VAE on binarized digits; ELBO in nats per image on the held-out split."""

    latent_dim: int = 8
    model_hidden: list[int] = field(default_factory=lambda: [128])
    elbo_samples: int = 10

    def validate(self, where: str) -> None:
        super().validate(where)
        check_sizes(where, "model_hidden", self.model_hidden)
        check_positive(where, latent_dim=self.latent_dim, elbo_samples=self.elbo_samples)


class VAETask(Task):
    downstream: VAE

    def __init__(self, config: Config, device: torch.device) -> None:
        t = config.task
        self.config, self.t, self.device = config, t, device
        self.sets = DigitSets(config, lambda x: (x > 0.5).float().flatten(1))
        self.pixels = self.sets.x_train.shape[1]
        self.downstream = VAE(self.pixels, latent_dim=t.latent_dim, hidden_sizes=t.model_hidden)
        self.downstream.to(device).requires_grad_(False)
        self.input_dim = self.pixels
        side = self.sets.images.x_train.shape[-1]
        self.example_shape = (1, side, side)
        self.num_datasets = len(self.sets)

    def sample(self, generator: torch.Generator) -> tuple[int, Tensor]:
        k, batch = self.sets.sample(generator)
        return k, batch.to(self.device)

    def loss(self, params: dict[str, Tensor], batch: Tensor) -> Tensor:
        log_density: Tensor = functional_call(self.downstream, params, (batch,))
        return -log_density.mean()

    def evaluate(
        self, hypernetwork: nn.Module, direct: nn.ModuleList, history: History, out: Path
    ) -> dict[str, Any]:
        elbo: dict[str, list[Tensor]] = {"hypernetwork": [], "direct": []}
        grids: dict[str, list[Tensor]] = {"hypernetwork": [], "direct": []}
        gen = torch.Generator(self.device).manual_seed(self.config.seed + 2000)
        per_row = 10 if len(self.sets) > 1 else 100
        with torch.no_grad():
            for k in range(len(self.sets)):
                test = self.sets.test(k).to(self.device)
                fits = {
                    "hypernetwork": hypernetwork(self.sets.train(k).to(self.device)),
                    "direct": dict(direct[k].named_parameters()),
                }
                for name, params in fits.items():
                    with bind(self.downstream, params):
                        elbo[name].append(
                            self.downstream.elbo(test, samples=self.t.elbo_samples).cpu()
                        )
                        grids[name].append(self.downstream.sample(per_row, generator=gen).cpu())
        nats = {k: torch.cat(v).mean().item() for k, v in elbo.items()}
        self._plot(grids, history, out / "vae.png")
        return {
            "elbo_hypernetwork": nats["hypernetwork"],
            "elbo_direct": nats["direct"],
            "amortization_gap": nats["direct"] - nats["hypernetwork"],
            "within_10_percent": within(
                nats["hypernetwork"], nats["direct"], higher_is_better=True
            ),
            "datasets": len(self.sets),
            "test_images": sum(len(e) for e in elbo["direct"]),
            "elbo_per_dataset": {n: [e.mean().item() for e in v] for n, v in elbo.items()},
        }

    def _plot(self, grids: Any, history: History, path: Path) -> None:
        side = int(self.pixels**0.5)
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
        for ax, (name, rows) in zip(axes, grids.items()):
            images = torch.cat(rows)[:100].reshape(-1, 10, side, side)
            ax.imshow(
                images.permute(0, 2, 1, 3).reshape(-1, 10 * side),
                cmap="gray_r",
                interpolation="nearest",
            )
            ax.set_title(
                f"{name}: samples" + (" (row = class)" if len(rows) > 1 else ""), fontsize=9
            )
            ax.axis("off")
        plot_losses(axes[-1], history, ylabel="negative ELBO (nats)")
        fig.tight_layout()
        fig.savefig(path, dpi=self.config.plot_dpi)
        plt.close(fig)


def _row(m: dict[str, Any]) -> list[str]:
    what = (
        "VAE, amortized: each digit class a set (10 VAEs)"
        if m["amortized"]
        else "VAE, all training digits"
    )
    return [
        f"{what}; {m['test_images']} held-out digits",
        "held-out ELBO, nats/image (higher is better)",
        number(m["elbo_hypernetwork"], 4),
        number(m["elbo_direct"], 4) + (" (one per class)" if m["amortized"] else ""),
        "—",
    ]


def _run(amortized: bool) -> dict[str, Any]:
    return {
        "threads": 1,
        "amortized": amortized,
        "steps": 3000,
        "batch_size": 128,
        "hidden_sizes": [32, 64, 96],
        "head": "dense",
        "lr": 0.001,
        "direct_lr": 0.001,
        "checkpoint_every": 500,
        "task": {"dataset": "digits", "latent_dim": 8, "model_hidden": [128], "elbo_samples": 10},
    }


EXPERIMENT = Experiment(
    name="vae",
    config=VAEConfig,
    task=VAETask,
    order=2,
    row=_row,
    runs={"vae": _run(False), "vae_amortized": _run(True)},
)
