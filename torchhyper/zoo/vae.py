r"""A variational autoencoder with a Bernoulli decoder, for binarized images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VAE"]


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    r"""A VAE with a diagonal Gaussian encoder, a standard normal prior and a Bernoulli decoder.

    ``forward`` returns the ELBO of each example with one reparametrized sample, in nats:
    ``E_q[log p(x | z)] - KL(q(z | x) || p(z))``, with the KL in closed form. The encoder outputs a
    log-variance, so any generated weights give a valid posterior.

    Args:
        features: Pixels per image ``D``; images come flattened ``(B, D)`` with values in {0, 1}.
        latent_dim: The latent dimension ``L``.
        hidden_sizes: Widths of the encoder's hidden layers; the decoder mirrors them.

    Example:
        >>> vae = VAE(64, latent_dim=8, hidden_sizes=[128])
        >>> vae((torch.rand(5, 64) > 0.5).float()).shape  # ELBO per image
        torch.Size([5])

    References:
        | Auto-Encoding Variational Bayes (Kingma and Welling, 2014)
        | https://arxiv.org/abs/1312.6114
    """

    def __init__(
        self, features: int, *, latent_dim: int = 8, hidden_sizes: Sequence[int] = (128,)
    ) -> None:
        super().__init__()
        for name, value in (("features", features), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        hidden = list(hidden_sizes)
        if not hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden
        ):
            raise ValueError(
                f"hidden_sizes must be a non-empty list of positive ints, got {hidden_sizes!r}"
            )
        self.features = features
        self.latent_dim = latent_dim
        self.encoder = _mlp([features, *hidden, 2 * latent_dim])
        self.decoder = _mlp([latent_dim, *hidden[::-1], features])

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""The posterior's mean and log-variance, ``(B, D) -> (B, L), (B, L)``."""
        h: Tensor = self.encoder(x)
        mean, log_var = h.chunk(2, dim=-1)
        return mean, log_var

    def decode(self, z: Tensor) -> Tensor:
        r"""Bernoulli logits of each pixel, ``(B, L) -> (B, D)``."""
        logits: Tensor = self.decoder(z)
        return logits

    def forward(self, x: Tensor) -> Tensor:
        r"""The ELBO of each image in nats, ``(B, D) -> (B,)``, with one sample of ``z``."""
        if x.dim() != 2 or x.shape[-1] != self.features:
            raise ValueError(f"x must have shape (B, {self.features}), got {tuple(x.shape)}")
        mean, log_var = self.encode(x)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        log_likelihood = -F.binary_cross_entropy_with_logits(
            self.decode(z), x, reduction="none"
        ).sum(-1)
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum(-1)
        return log_likelihood - kl

    def elbo(self, x: Tensor, *, samples: int = 1) -> Tensor:
        r"""The ELBO of each image ``(B,)``, averaged over ``samples`` draws of ``z``."""
        return torch.stack([self(x) for _ in range(samples)]).mean(0)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        r"""Decodes ``n`` draws from the prior into pixel probabilities ``(n, D)``."""
        weight = next(self.decoder.parameters())  # the first layer's weight
        z = torch.randn(
            n, self.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype
        )
        return torch.sigmoid(self.decode(z))
