r"""Set pooling: how the per-example encodings of a set become one embedding.

A pool maps encodings ``(B, H)`` of a set of ``B`` examples to one embedding ``(H,)``, and must
not depend on the order of the examples. :class:`~torchhyper.HyperNetwork` takes one with its
``pool=`` argument:

=================  ==============================================================  ============
``pool=``          embedding                                                       parameters
=================  ==============================================================  ============
``"mean"``         the average: the original torchhyper's; any set size            none
``"sum"``          the sum: keeps the set's size in the embedding (Deep Sets)      none
``"max"``          the element-wise maximum                                        none
``"attention"``    :class:`AttentionPool`: a learned query attends to the set      ``~4 H^2``
                   (Set Transformer PMA); weighs examples instead of averaging
a callable         any ``(B, H) -> (H,)``; an ``nn.Module`` is registered and      yours
                   trained
=================  ==============================================================  ============

All of them take any set size at test time. Mean pooling underfits rich sets (Kim et al. 2019):
attention pooling lets the embedding weigh the examples by content.

References:
    | Deep Sets (Zaheer et al., 2017)
    | https://arxiv.org/abs/1703.06114
    | Set Transformer (Lee et al., 2019)
    | https://arxiv.org/abs/1810.00825
    | Attentive Neural Processes (Kim et al., 2019)
    | https://arxiv.org/abs/1901.05761
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor, nn

__all__ = ["AttentionPool", "POOLS", "Pool"]

Pool = Callable[[Tensor], Tensor]


def _mean(e: Tensor) -> Tensor:
    return e.mean(dim=-2)


def _sum(e: Tensor) -> Tensor:
    return e.sum(dim=-2)


def _max(e: Tensor) -> Tensor:
    return e.amax(dim=-2)


#: The named reductions: each maps ``(*, B, H)`` to ``(*, H)``.
POOLS: dict[str, Pool] = {"mean": _mean, "sum": _sum, "max": _max}


class AttentionPool(nn.Module):
    r"""Pooling by multihead attention (PMA of the Set Transformer) with one learned seed query.

    With ``E = relu(W_e e + b_e)`` the encoded set, ``s`` a learned seed vector, and ``MHA`` a
    multihead attention of ``s`` over the set ``E``:

    ``a = LN(s + MHA(s, E, E))``, output ``LN(a + relu(W_f a + b_f))``.

    Softmax attention over the set is invariant to the order of its examples and takes any set
    size; a single query returns one embedding of the same width ``H``.

    Args:
        features: The encoding width ``H``.
        heads: Attention heads; must divide ``features``. Default: 4, 2 or 1, the largest that
            divides it.

    Example:
        >>> pool = AttentionPool(64)
        >>> pool(torch.randn(10, 64)).shape    # one set of 10
        torch.Size([64])
        >>> pool(torch.randn(3, 10, 64)).shape  # three sets of 10
        torch.Size([3, 64])

    References:
        | Set Transformer: A Framework for Attention-based Permutation-Invariant Neural
        | Networks (Lee et al., 2019). https://arxiv.org/abs/1810.00825
    """

    def __init__(self, features: int, *, heads: int | None = None) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        if heads is None:
            heads = next(h for h in (4, 2, 1) if features % h == 0)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or features % heads:
            raise ValueError(
                f"heads must be a positive int that divides features={features}, got {heads!r}"
            )
        self.features = features
        self.heads = heads
        self.encode = nn.Sequential(nn.Linear(features, features), nn.ReLU())
        self.seed = nn.Parameter(torch.randn(features) / features**0.5)
        self.attention = nn.MultiheadAttention(features, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(features)
        self.feedforward = nn.Sequential(nn.Linear(features, features), nn.ReLU())
        self.norm2 = nn.LayerNorm(features)

    def forward(self, e: Tensor) -> Tensor:
        r"""Pools sets of encodings ``(*, B, H)`` into embeddings ``(*, H)``."""
        if e.dim() < 2 or e.shape[-1] != self.features:
            raise ValueError(
                f"AttentionPool expects encodings (*, B, H) with H == {self.features}, "
                f"got shape {tuple(e.shape)}"
            )
        batch = e.shape[:-2]
        sets = e.reshape(-1, *e.shape[-2:])  # (S, B, H)
        keys = self.encode(sets)
        query = self.seed.expand(sets.shape[0], 1, self.features)
        attended = self.attention(query, keys, keys, need_weights=False)[0]
        a = self.norm1(query + attended)
        out = self.norm2(a + self.feedforward(a))
        return out.reshape(*batch, self.features)

    def extra_repr(self) -> str:
        return f"features={self.features}, heads={self.heads}"


def _make_pool(pool: Union[str, Pool], features: int) -> Pool:
    if isinstance(pool, str):
        if pool == "attention":
            return AttentionPool(features)
        if pool not in POOLS:
            raise ValueError(
                f"pool must be one of {sorted(POOLS)} or a callable, got {pool!r} "
                "(attention pooling: pool='attention', or pool=AttentionPool(width, heads=...))"
            )
        return POOLS[pool]
    if not callable(pool):
        raise TypeError(f"pool must be a name or a callable (B, H) -> (H,), got {pool!r}")
    return pool


def _pool_sets(pool: Pool, e: Tensor) -> Tensor:
    """Pools each set of ``e`` (S, B, H) separately: (S, H)."""
    if pool in POOLS.values() or isinstance(pool, AttentionPool):
        return pool(e)
    # A user's pool is only known to take one set (B, H): map it over the sets.
    return torch.vmap(pool)(e)
