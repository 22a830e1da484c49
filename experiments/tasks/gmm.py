r"""GMM: a hypernetwork reads samples of a 1-D Gaussian mixture and generates the mixture.

Single dataset (the original's): weights 0.8/0.2, means 0 and 2, unit variances; a fixed sample
of ``n_train`` points, minibatches of ``batch_size``. Metric: Monte-Carlo KL(true || predicted),
against the same mixture fitted directly (Adam, same batches) and by EM (scikit-learn).

Amortized: every step draws fresh random mixtures; evaluation draws ``eval_datasets`` held-out
mixtures, ``batch_size`` points each, and compares the hypernetwork's one-pass prediction with a
direct fit and EM on the same points (the amortization gap).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.func import functional_call

from experiments.config import Config
from experiments.tasks.base import Task, fit_direct, plot_losses, within
from torchhyper import load_params
from torchhyper.zoo import GaussianMixture

__all__ = ["GMMExperiment"]


def _mixture(weights: Tensor, means: Tensor, variances: Tensor) -> GaussianMixture:
    gmm = GaussianMixture(len(weights), dim=1)
    load_params(
        gmm,
        {
            "logits": weights.log(),
            "means": means.reshape(-1, 1),
            "log_scales": 0.5 * variances.log().reshape(-1, 1),
        },
    )
    return gmm.requires_grad_(False)


class GMMExperiment(Task):
    def __init__(self, config: Config, device: torch.device) -> None:
        t = config.task
        self.config, self.t, self.device = config, t, device
        self.components = len(t.weights)
        self.downstream = GaussianMixture(self.components, dim=1).to(device).requires_grad_(False)
        self.input_dim = 1
        data_gen = torch.Generator().manual_seed(config.seed + 1000)
        if config.amortized:
            self.num_datasets = 0
        else:
            self.num_datasets = 1
            self.truth = _mixture(
                torch.tensor(t.weights), torch.tensor(t.means), torch.tensor(t.variances)
            )
            self.data = self.truth.sample(t.n_train, generator=data_gen)

    def random_mixture(self, generator: torch.Generator) -> GaussianMixture:
        r"""A mixture of the family: weights ~ uniform(0.5, 1.5) normalized, means uniform in
        ``mean_range``, variances log-uniform in ``variance_range``."""
        k, (lo, hi), (vlo, vhi) = self.components, self.t.mean_range, self.t.variance_range
        u = torch.rand(3, k, generator=generator)
        weights = (0.5 + u[0]) / (0.5 + u[0]).sum()
        means = lo + (hi - lo) * u[1]
        variances = torch.exp(math.log(vlo) + (math.log(vhi) - math.log(vlo)) * u[2])
        return _mixture(weights, means, variances)

    def sample(self, generator: torch.Generator) -> tuple[int, Tensor]:
        if self.config.amortized:
            return -1, self.random_mixture(generator).sample(
                self.config.batch_size, generator=generator
            ).to(self.device)
        index = torch.randperm(len(self.data), generator=generator)[: self.config.batch_size]
        return 0, self.data[index].to(self.device)

    def loss(self, params: dict[str, Tensor], batch: Tensor) -> Tensor:
        return -functional_call(self.downstream, params, (batch,)).mean()

    # Evaluation ---------------------------------------------------------------------------

    def kl(
        self, truth: GaussianMixture, params: dict[str, Tensor], generator: torch.Generator
    ) -> float:
        r"""Monte-Carlo KL(truth || downstream with params), in nats."""
        x = truth.sample(self.t.mc_samples, generator=generator)
        with torch.no_grad():
            predicted = functional_call(
                self.downstream.cpu(), {k: v.cpu() for k, v in params.items()}, (x,)
            )
        return (truth(x) - predicted).mean().item()

    def em(self, data: Tensor) -> dict[str, Tensor]:
        r"""The mixture that EM (scikit-learn) fits to ``data``."""
        from sklearn.mixture import GaussianMixture as SKMixture

        fit = SKMixture(
            self.components, covariance_type="diag", n_init=3, random_state=self.config.seed
        )
        fit.fit(data.double().numpy())
        return {
            "logits": torch.tensor(fit.weights_, dtype=torch.float32).log(),
            "means": torch.tensor(fit.means_, dtype=torch.float32),
            "log_scales": 0.5 * torch.tensor(fit.covariances_, dtype=torch.float32).log(),
        }

    def evaluate(self, hypernetwork, direct: nn.ModuleList, history, out: Path) -> dict[str, Any]:
        eval_gen = torch.Generator().manual_seed(self.config.seed + 2000)
        if self.config.amortized:
            return self._finish_amortized(hypernetwork, history, out, eval_gen)
        with torch.no_grad():
            fits = {
                "hypernetwork": hypernetwork(self.data.to(self.device)),
                "direct": dict(direct[0].named_parameters()),
                "em": self.em(self.data),
            }
        kl = {
            name: self.kl(self.truth, p, torch.Generator().manual_seed(self.config.seed + 3000))
            for name, p in fits.items()
        }
        self._plot([(self.truth, self.data, fits)], history, out / "gmm.png")
        return {
            "kl_hypernetwork": kl["hypernetwork"],
            "kl_direct": kl["direct"],
            "kl_em": kl["em"],
            "kl_truth": 0.0,
            "within_10_percent": within(kl["hypernetwork"], kl["direct"]),
            "fits": {name: _describe(p) for name, p in fits.items()},
            "truth": {
                "weights": self.t.weights,
                "means": self.t.means,
                "variances": self.t.variances,
            },
        }

    def _finish_amortized(
        self, hypernetwork, history, out: Path, eval_gen: torch.Generator
    ) -> dict[str, Any]:
        kls: dict[str, list[float]] = {"hypernetwork": [], "direct": [], "em": []}
        panels = []
        for i in range(self.t.eval_datasets):
            truth = self.random_mixture(eval_gen)
            data = truth.sample(self.config.batch_size, generator=eval_gen)
            with torch.no_grad():
                hyper = hypernetwork(data.to(self.device))
            fits = {
                "hypernetwork": hyper,
                "direct": fit_direct(
                    self.downstream,
                    self.loss,
                    data.to(self.device),
                    steps=self.t.direct_steps,
                    lr=self.config.direct_lr,
                ),
                "em": self.em(data),
            }
            for name, p in fits.items():
                kls[name].append(
                    self.kl(truth, p, torch.Generator().manual_seed(self.config.seed + 3000 + i))
                )
            if i < 4:
                panels.append((truth, data, fits))
        self._plot(panels, history, out / "gmm.png")
        mean = {k: sum(v) / len(v) for k, v in kls.items()}
        return {
            "kl_hypernetwork": mean["hypernetwork"],
            "kl_direct": mean["direct"],
            "kl_em": mean["em"],
            "kl_truth": 0.0,
            "amortization_gap": mean["hypernetwork"] - mean["direct"],
            "within_10_percent": within(mean["hypernetwork"], mean["direct"]),
            "eval_datasets": self.t.eval_datasets,
            "points_per_dataset": self.config.batch_size,
            "per_dataset": kls,
        }

    def _plot(self, panels, history, path: Path) -> None:
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 2.6))
        grid = torch.linspace(-8, 8, 400)[:, None]
        for ax, (truth, data, fits) in zip(axes, panels):
            lo, hi = data.min().item() - 2, data.max().item() + 2
            g = grid[(grid[:, 0] > lo) & (grid[:, 0] < hi)]
            ax.hist(data[:, 0].numpy(), bins=40, density=True, color="0.85")
            with torch.no_grad():
                ax.plot(g[:, 0], truth(g).exp(), "k-", lw=1.5, label="truth")
                for (name, p), style in zip(fits.items(), ("C0-", "C1--", "C2:")):
                    cpu = {k: v.detach().cpu() for k, v in p.items()}
                    ax.plot(
                        g[:, 0],
                        functional_call(self.downstream.cpu(), cpu, (g,)).exp(),
                        style,
                        lw=1.2,
                        label=name,
                    )
            ax.set_xlabel("x")
        axes[0].set_ylabel("density")
        axes[0].legend(fontsize=6)
        plot_losses(axes[-1], history, ylabel="NLL (nats)")
        fig.tight_layout()
        fig.savefig(path, dpi=self.config.plot_dpi)
        plt.close(fig)
        self.downstream.to(self.device)


def _describe(params: dict[str, Tensor]) -> dict[str, list[float]]:
    p = {k: v.detach().cpu() for k, v in params.items()}
    return {
        "weights": torch.softmax(p["logits"], -1).tolist(),
        "means": p["means"][:, 0].tolist(),
        "variances": p["log_scales"][:, 0].mul(2).exp().tolist(),
    }
