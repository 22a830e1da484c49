r"""Flow: a hypernetwork reads samples of a Gaussian and generates an element-wise affine flow.

Single dataset (the original's): 12-D, mean 1, covariance diag(1..12); a fixed sample of
``n_train`` points, minibatches of ``batch_size``. The flow's maximum-likelihood fit has a closed
form (the sample mean and the per-dimension biased sample variances), so the metric is the
relative error of the recovered mean and covariance against that analytic MLE, for the
hypernetwork and for the flow trained directly; the MLE's own error against the truth is the
sampling floor.

Amortized: every step draws fresh random Gaussians (means uniform in ``mean_range``, variances
log-uniform in ``variance_range``); evaluation uses ``eval_datasets`` held-out Gaussians of
``batch_size`` points each, fitted directly for ``direct_steps`` steps.
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
from torchhyper.zoo import AffineFlow

__all__ = ["FlowExperiment"]


def _moments(params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    r"""The mean ``(D,)`` and the diagonal of the covariance ``(D,)`` a flow's params model."""
    log_scale, shift = params["log_scale"].detach().cpu(), params["shift"].detach().cpu()
    return -shift * torch.exp(-log_scale), torch.exp(-2 * log_scale)


def _errors(mean: Tensor, var: Tensor, ref_mean: Tensor, ref_var: Tensor) -> tuple[float, float]:
    r"""Relative errors ``||mean - ref|| / ||ref||`` and ``||cov - ref||_F / ||ref||_F``."""
    return ((mean - ref_mean).norm() / ref_mean.norm()).item(), (
        (var - ref_var).norm() / ref_var.norm()
    ).item()


class FlowExperiment(Task):
    def __init__(self, config: Config, device: torch.device) -> None:
        t = config.task
        self.config, self.t, self.device = config, t, device
        self.dim = len(t.mean)
        self.downstream = AffineFlow(self.dim).to(device).requires_grad_(False)
        self.input_dim = self.dim
        if config.amortized:
            self.num_datasets = 0
        else:
            self.num_datasets = 1
            self.mean, self.var = torch.tensor(t.mean), torch.tensor(t.variances)
            gen = torch.Generator().manual_seed(config.seed + 1000)
            self.data = self.mean + self.var.sqrt() * torch.randn(
                t.n_train, self.dim, generator=gen
            )

    def random_gaussian(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        (lo, hi), (vlo, vhi) = self.t.mean_range, self.t.variance_range
        u = torch.rand(2, self.dim, generator=generator)
        return lo + (hi - lo) * u[0], torch.exp(
            math.log(vlo) + (math.log(vhi) - math.log(vlo)) * u[1]
        )

    def sample(self, generator: torch.Generator) -> tuple[int, Tensor]:
        n = self.config.batch_size
        if self.config.amortized:
            mean, var = self.random_gaussian(generator)
            return -1, (mean + var.sqrt() * torch.randn(n, self.dim, generator=generator)).to(
                self.device
            )
        return 0, self.data[torch.randperm(len(self.data), generator=generator)[:n]].to(self.device)

    def loss(self, params: dict[str, Tensor], batch: Tensor) -> Tensor:
        return -functional_call(self.downstream, params, (batch,)).mean()

    # Evaluation ---------------------------------------------------------------------------

    def _score(
        self, data: Tensor, mean: Tensor, var: Tensor, fits: dict[str, dict[str, Tensor]]
    ) -> dict[str, float]:
        mle_mean, mle_var = data.mean(0), data.var(0, unbiased=False)
        scores = {}
        for name, params in fits.items():
            m, v = _moments(params)
            scores[f"mean_error_{name}"], scores[f"cov_error_{name}"] = _errors(
                m, v, mle_mean, mle_var
            )
            scores[f"mean_error_vs_truth_{name}"], scores[f"cov_error_vs_truth_{name}"] = _errors(
                m, v, mean, var
            )
        scores["mean_error_vs_truth_mle"], scores["cov_error_vs_truth_mle"] = _errors(
            mle_mean, mle_var, mean, var
        )
        return scores

    def evaluate(self, hypernetwork, direct: nn.ModuleList, history, out: Path) -> dict[str, Any]:
        panels = []
        if self.config.amortized:
            gen = torch.Generator().manual_seed(self.config.seed + 2000)
            runs = []
            for i in range(self.t.eval_datasets):
                mean, var = self.random_gaussian(gen)
                data = mean + var.sqrt() * torch.randn(
                    self.config.batch_size, self.dim, generator=gen
                )
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
                }
                runs.append(self._score(data, mean, var, fits))
                if i < 2:
                    panels.append((data, mean, var, fits))
            metrics: dict[str, Any] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
            metrics["eval_datasets"] = self.t.eval_datasets
            metrics["points_per_dataset"] = self.config.batch_size
            metrics["amortization_gap_cov_error_vs_truth"] = (
                metrics["cov_error_vs_truth_hypernetwork"] - metrics["cov_error_vs_truth_direct"]
            )
        else:
            with torch.no_grad():
                fits = {
                    "hypernetwork": hypernetwork(self.data.to(self.device)),
                    "direct": dict(direct[0].named_parameters()),
                }
            metrics = self._score(self.data, self.mean, self.var, fits)
            panels.append((self.data, self.mean, self.var, fits))
            m, v = _moments(fits["hypernetwork"])
            metrics["recovered_mean_hypernetwork"], metrics["recovered_variances_hypernetwork"] = (
                m.tolist(),
                v.tolist(),
            )
        metrics["within_10_percent"] = within(
            metrics["cov_error_vs_truth_hypernetwork"], metrics["cov_error_vs_truth_direct"]
        )
        self._plot(panels, history, out / "flow.png")
        return metrics

    def _plot(self, panels, history, path: Path) -> None:
        fig, axes = plt.subplots(1, 2 * len(panels) + 1, figsize=(3.2 * (2 * len(panels) + 1), 2.6))
        dims = torch.arange(1, self.dim + 1)
        for i, (data, mean, var, fits) in enumerate(panels):
            for ax, k, title in ((axes[2 * i], 0, "mean"), (axes[2 * i + 1], 1, "variance")):
                ax.plot(dims, (mean, var)[k], "k-", lw=1.5, label="truth")
                ax.plot(
                    dims,
                    (data.mean(0), data.var(0, unbiased=False))[k],
                    "ks",
                    ms=4,
                    mfc="none",
                    label="MLE",
                )
                for (name, p), style in zip(fits.items(), ("C0o", "C1x")):
                    ax.plot(dims, _moments(p)[k], style, ms=4, label=name)
                ax.set_xlabel("dimension")
                ax.set_title(title, fontsize=9)
        axes[0].legend(fontsize=6)
        plot_losses(axes[-1], history, ylabel="NLL (nats)")
        fig.tight_layout()
        fig.savefig(path, dpi=self.config.plot_dpi)
        plt.close(fig)
