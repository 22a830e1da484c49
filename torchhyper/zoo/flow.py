r"""An element-wise affine normalizing flow: the simplest flow, with a closed-form MLE."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["AffineFlow"]


class AffineFlow(nn.Module):
    r"""Maps data ``x`` to a standard normal ``z = exp(log_scale) * x + shift``, element-wise.

    It models ``x ~ N(mean, diag(variance))`` with ``mean = -shift * exp(-log_scale)`` and
    ``variance = exp(-2 log_scale)``; any real parameters give a valid, invertible flow. The
    log-density is ``log N(z; 0, I) + sum(log_scale)`` (the log-determinant of the Jacobian).

    Parameters: ``log_scale`` ``(D,)`` and ``shift`` ``(D,)``, both zero at init (the identity).

    Args:
        features: The dimension ``D`` of the data.

    Example:
        >>> flow = AffineFlow(12)
        >>> flow(torch.randn(5, 12)).shape  # log-densities
        torch.Size([5])

    References:
        | Normalizing Flows for Probabilistic Modeling and Inference (Papamakarios et al., 2021)
        | https://arxiv.org/abs/1912.02762
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        self.features = features
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def transform(self, x: Tensor) -> Tensor:
        r"""Data to noise: ``(B, D) -> (B, D)``."""
        return torch.exp(self.log_scale) * x + self.shift

    def inverse(self, z: Tensor) -> Tensor:
        r"""Noise to data: ``(B, D) -> (B, D)``."""
        return (z - self.shift) * torch.exp(-self.log_scale)

    def forward(self, x: Tensor) -> Tensor:
        r"""The log-density of each example: ``(B, D) -> (B,)``."""
        if x.dim() != 2 or x.shape[-1] != self.features:
            raise ValueError(f"x must have shape (B, {self.features}), got {tuple(x.shape)}")
        z = self.transform(x)
        return (
            -0.5 * z.square().sum(-1)
            - 0.5 * self.features * math.log(2 * math.pi)
            + self.log_scale.sum()
        )

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Same as ``forward``: the log-density ``(B, D) -> (B,)``."""
        log_density: Tensor = self(x)
        return log_density

    @property
    def mean(self) -> Tensor:
        r"""The mean ``(D,)`` of the modelled distribution."""
        return -self.shift * torch.exp(-self.log_scale)

    @property
    def covariance(self) -> Tensor:
        r"""The covariance ``(D, D)`` of the modelled distribution (diagonal)."""
        return torch.diag(torch.exp(-2 * self.log_scale))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Draws ``n`` examples ``(n, D)``."""
        z = torch.randn(
            n, self.features, generator=generator, device=self.shift.device, dtype=self.shift.dtype
        )
        return self.inverse(z)
