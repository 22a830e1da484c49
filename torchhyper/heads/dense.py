r"""Heads with a dense output layer: :class:`DenseHead` (one linear map to every value) and
:class:`ChunkedHead` (a shared generator, one chunk of values at a time)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchhyper._checks import positive_int, renamed
from torchhyper.heads.head import Head, _zero, register_head

__all__ = ["DenseHead", "ChunkedHead"]


@register_head("dense")
class DenseHead(Head):
    r"""One fused linear map from the embedding to every value: a linear head per tensor, as a
    single matrix product.

    It costs ``(H + 1) N`` parameters for ``N`` generated values (``H + 1`` times what it
    generates) and ``H N`` multiply-adds: the choice of ``head="auto"`` while that fits
    :data:`~torchhyper.heads.AUTO_BUDGET`.
    """

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__(in_features, shapes)
        self.weight = nn.Parameter(torch.randn(self.numel, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(self.numel))

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight, self.bias)

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], spread: Tensor, gain: Tensor
    ) -> list[Tensor]:
        if z[..., 0].numel() <= self.in_features:
            return super().assemble(z, bases, spread, gain)
        # Many sets at once (per sample): folding each value's coefficient (spread * gain) and
        # base into the weights costs N * H operations instead of B * N, forward and backward.
        coef = torch.cat([c.expand(n) for c, n in zip((spread * gain).unbind(), self.numels)])
        base = torch.cat([b.expand(n) for b, n in zip(bases, self.numels)])
        weight = self.weight * coef.unsqueeze(-1)
        return list(
            F.linear(z, weight, torch.addcmul(base, coef, self.bias)).split(self.numels, dim=-1)
        )

    def zero_update_(self) -> bool:
        return _zero(self.weight, self.bias)


@register_head("chunked")
class ChunkedHead(Head):
    r"""A shared generator that emits the values ``chunk_size`` at a time, each chunk conditioned
    on a learned chunk embedding (von Oswald et al. 2020).

    Chunk ``c`` gets ``a_c = norm(relu(U z + V e_c + b))`` of width ``rank``, then
    ``h_c = W a_c + w`` with ``W`` of shape ``(chunk_size, rank)``. Parameters:
    ``r (C + H + d + 1) + C + d N / C``, growing with ``N`` only through the chunk embeddings
    ``e_c``; the forward costs ``r N`` multiply-adds (one forward of the downstream on a batch of
    ``B`` costs about ``B N``). Its values have rank at most ``r + 1`` as a ``(chunks, C)``
    matrix.

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors.
        chunk_size: Values per chunk ``C``.
        chunk_dim: Width ``d`` of the learned chunk embeddings ``e_c``.
        rank: Width ``r`` of the generator's hidden layer.

    References:
        | Continual learning with hypernetworks (von Oswald et al., 2020)
        | https://arxiv.org/abs/1906.00695
    """

    @renamed(embedding_dim="chunk_dim")
    def __init__(
        self,
        in_features: int,
        shapes: Sequence[Sequence[int]],
        *,
        chunk_size: int = 1024,
        chunk_dim: int = 8,
        rank: int = 16,
    ) -> None:
        super().__init__(in_features, shapes)
        positive_int("chunk_size", chunk_size)
        positive_int("chunk_dim", chunk_dim)
        positive_int("rank", rank)
        self.chunk_size = min(chunk_size, max(1, self.numel))
        self.chunks = -(-self.numel // self.chunk_size)
        self.embeddings = nn.Parameter(torch.randn(self.chunks, chunk_dim))  # e_c
        self.mix = nn.Linear(in_features + chunk_dim, rank)
        self.weight = nn.Parameter(torch.randn(self.chunk_size, rank) / math.sqrt(rank))
        self.bias = nn.Parameter(torch.zeros(self.chunk_size))

    def forward(self, z: Tensor) -> Tensor:
        in_z, in_e = self.mix.weight.split([self.in_features, self.embeddings.shape[1]], dim=1)
        # The embedding's part is shared by every chunk: compute it once, not per chunk.
        a = F.linear(z, in_z, self.mix.bias).unsqueeze(-2) + self.embeddings @ in_e.T
        a = F.rms_norm(F.relu(a), a.shape[-1:])  # (*, chunks, rank), unit scale
        h = F.linear(a, self.weight, self.bias)  # (*, chunks, chunk_size)
        return h.flatten(-2)[..., : self.numel]

    def zero_update_(self) -> bool:
        return _zero(self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, chunks={self.chunks}"
