r"""VAE: a hypernetwork reads a set of binarized digits and generates a VAE for them.

Single dataset: all training digits. Amortized: each digit class is a dataset; the hypernetwork
generates one VAE per class from that class's training images, and one VAE per class is trained
directly on the same sets (so the same total number of steps). Metric: the ELBO of held-out
(test) digits, in nats per image (higher is better), averaged over ``elbo_samples`` draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from experiments.common.digits import DigitsConfig, DigitsTask
from experiments.common.plots import panels, plot_losses, tile
from experiments.config import check_positive, check_sizes
from experiments.experiment import Experiment, History, number, within
from torchhyper import bind
from torchhyper.zoo import VAE

if TYPE_CHECKING:
    from experiments.config import Config

__all__ = ["EXPERIMENT", "VAEConfig", "VAETask"]


@dataclass
class VAEConfig(DigitsConfig):
    r"""A VAE on binarized digits; ELBO in nats per image on the held-out split."""

    latent_dim: int = 8
    hidden_sizes: list[int] = field(default_factory=lambda: [128])  # the VAE's (zoo.VAE's)
    elbo_samples: int = 10
    renamed: ClassVar[dict[str, str]] = {"model_hidden": "hidden_sizes"}  # in 0.4.0

    def validate(self, where: str) -> None:
        super().validate(where)
        check_sizes(where, "hidden_sizes", self.hidden_sizes)
        check_positive(where, latent_dim=self.latent_dim, elbo_samples=self.elbo_samples)


class VAETask(DigitsTask):
    downstream: VAE

    def __init__(self, config: Config, device: torch.device) -> None:
        super().__init__(config, device, lambda x: (x > 0.5).float().flatten(1))
        self.t = t = config.task
        self.downstream = VAE(self.input_dim, latent_dim=t.latent_dim, hidden_sizes=t.hidden_sizes)
        self.downstream.to(device).requires_grad_(False)

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
        r"""100 samples of each model (a row per class, amortized); the training losses."""
        side = self.sets.images.size
        with panels(path, 3, dpi=self.config.plot_dpi) as axes:
            for ax, (name, rows) in zip(axes, grids.items()):
                images = torch.cat(rows)[:100].reshape(-1, 10, 1, side, side)
                ax.imshow(tile(list(images), 10, fill=0.0), cmap="gray_r", vmin=0, vmax=1)
                ax.set_title(f"{name}: samples" + (" (row = class)" if len(rows) > 1 else ""))
                ax.axis("off")
            plot_losses(axes[-1], history, ylabel="negative ELBO (nats)")


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
        "task": {"dataset": "digits", "latent_dim": 8, "hidden_sizes": [128], "elbo_samples": 10},
    }


EXPERIMENT = Experiment(
    name="vae",
    config=VAEConfig,
    task=VAETask,
    order=2,
    row=_row,
    runs={"vae": _run(False), "vae_amortized": _run(True)},
)
