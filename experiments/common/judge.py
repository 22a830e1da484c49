r"""Judging generated digits: a classifier trained on the training split, its feature space for
a Fréchet distance (as FID does with Inception features), and its predicted classes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from experiments.common.fit import fit

__all__ = ["DigitClassifier", "frechet_distance"]


class DigitClassifier(nn.Module):
    r"""An MLP ``(N, *) -> (N, classes)``; ``features`` is its last hidden layer ``(N, 64)``."""

    def __init__(self, pixels: int, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(pixels, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()
        )
        self.out = nn.Linear(64, classes)

    def features(self, x: Tensor) -> Tensor:
        features: Tensor = self.body(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.out(self.body(x))
        return logits

    @classmethod
    def fitted(cls, x: Tensor, y: Tensor, *, steps: int, seed: int) -> DigitClassifier:
        r"""Trains on ``(x, y)`` with Adam at a constant rate, full batch, with light noise for
        robustness."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(x[0].numel(), int(y.max()) + 1)

            def loss() -> Tensor:
                noisy = x + 0.1 * torch.randn_like(x)
                return nn.functional.cross_entropy(model(noisy), y)

            fit(model.parameters(), loss, steps=steps, lr=1e-3, weight_decay=1e-4, cosine=False)
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def score(
        self, samples: list[Tensor], real: Tensor, classes: list[int] | None = None
    ) -> dict[str, Any]:
        r"""How alike ``samples`` (a list of ``(N, *)``, one per set) are to real digits whose
        :meth:`features` are ``real`` ``(M, 64)``: ``fd``, the :func:`frechet_distance` of all
        the samples; with ``classes`` (the class each set was generated for),
        ``class_fraction_per_class``, the share of each set classified as its class, and
        ``class_fraction``, their mean."""
        scores: dict[str, Any] = {"fd": frechet_distance(self.features(torch.cat(samples)), real)}
        if classes is not None:
            hits = [
                (self(x).argmax(1) == c).float().mean().item() for c, x in zip(classes, samples)
            ]
            scores["class_fraction"] = sum(hits) / len(hits)
            scores["class_fraction_per_class"] = hits
        return scores


def frechet_distance(a: Tensor, b: Tensor) -> float:
    r"""The Fréchet distance between Gaussians fitted to features ``a`` ``(N, F)`` and ``b``
    ``(M, F)``: ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    References:
        | GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium
        | (Heusel et al., 2017) https://arxiv.org/abs/1706.08500
    """
    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    # A small ridge keeps the square root defined when features are dead (singular covariances).
    ridge = 1e-6 * np.eye(a64.shape[1])
    cov_a, cov_b = np.cov(a64, rowvar=False) + ridge, np.cov(b64, rowvar=False) + ridge
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
