r"""A Gaussian mixture with diagonal covariances, valid for any values of its parameters."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["GaussianMixture"]


class GaussianMixture(nn.Module):
    r"""A mixture of ``components`` Gaussians over ``features`` dimensions, diagonal covariances.

    Parametrized so that every real value of every parameter is a valid mixture: the weights are
    ``softmax(logits)`` and the standard deviations ``exp(log_scales)``. A hypernetwork can then
    generate the parameters freely.

    Parameters: ``logits`` ``(K,)``, ``means`` ``(K, D)``, ``log_scales`` ``(K, D)``.

    Args:
        components: The number of components ``K``.
        features: The dimension ``D`` of the data.

    Example:
        >>> gmm = GaussianMixture(2, features=1)
        >>> gmm(torch.randn(5, 1)).shape  # log-densities
        torch.Size([5])
    """

    def __init__(self, components: int, *, features: int = 1) -> None:
        super().__init__()
        for name, value in (("components", components), ("features", features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.components = components
        self.features = features
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(torch.zeros(components, features))
        self.log_scales = nn.Parameter(torch.zeros(components, features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Equal weights, unit variances, means drawn from a standard normal."""
        with torch.no_grad():
            self.logits.zero_()
            self.means.normal_()
            self.log_scales.zero_()

    @property
    def weights(self) -> Tensor:
        r"""The mixture weights ``(K,)``, positive and summing to one."""
        return torch.softmax(self.logits, dim=-1)

    @property
    def variances(self) -> Tensor:
        r"""The per-dimension variances ``(K, D)``."""
        return torch.exp(2 * self.log_scales)

    def forward(self, x: Tensor) -> Tensor:
        r"""The log-density of each example: ``(B, D) -> (B,)``."""
        if x.dim() != 2 or x.shape[-1] != self.features:
            raise ValueError(f"x must have shape (B, {self.features}), got {tuple(x.shape)}")
        z = (x[:, None, :] - self.means) * torch.exp(-self.log_scales)  # (B, K, D)
        log_normal = (
            -0.5 * z.square().sum(-1)
            - self.log_scales.sum(-1)
            - 0.5 * self.features * math.log(2 * math.pi)
        )
        return torch.logsumexp(torch.log_softmax(self.logits, dim=-1) + log_normal, dim=-1)

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Same as ``forward``: the log-density ``(B, D) -> (B,)``."""
        log_density: Tensor = self(x)
        return log_density

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draws ``n`` examples ``(n, D)``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(
            n, self.features, generator=generator, device=self.means.device, dtype=self.means.dtype
        )
        return self.means[k] + noise * torch.exp(self.log_scales[k])
