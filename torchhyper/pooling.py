r"""Set pooling: how the per-example encodings of a set become one embedding.

**The pool contract.** A pool is a :class:`Pool`: a module that maps the encodings
``(*, B, H)`` of sets of ``B`` examples to one embedding ``(*, H)`` per set, for any leading
batch ``*`` (empty for :meth:`HyperNetwork.forward <torchhyper.HyperNetwork.forward>`, the sets
``S`` for ``per_set``, the examples for ``per_sample``, each its own set of one). It must not
depend on the order of the examples, and it takes any ``B``. :meth:`Pool.local` is the same map
over this process's share of a set only: the two differ only for the pools of
:mod:`torchhyper.distributed`, which reduce over every process.

:class:`~torchhyper.HyperNetwork` takes a pool with ``pool=``:

=================  ==============================================================  ============
``pool=``          embedding                                                       parameters
=================  ==============================================================  ============
``"mean"``         the average (the default); any set size                         none
``"sum"``          the sum: keeps the set's size in the embedding (Deep Sets)      none
``"max"``          the element-wise maximum                                        none
``"moments"``      :class:`MomentsPool`: the mean and the standard deviation,      ``2 H^2``
                   mixed by a linear layer; keeps the set's spread
``"attention"``    :class:`AttentionPool`: learned queries attend to the set       ``~4 H^2``
                   (Set Transformer PMA); weighs examples instead of averaging
a :class:`Pool`    used as it is, e.g. ``AttentionPool(H, num_heads=2)``           yours
a callable         any ``(B, H) -> (H,)`` for one set; wrapped once, mapped over   yours
                   sets with :func:`torch.vmap`; an ``nn.Module`` is trained
=================  ==============================================================  ============

The names are the keys of :data:`POOLS`; a :class:`Pool` subclass decorated with
:func:`register_pool` is a new name. Every pool's output shape is checked once, on a dummy set,
when the hypernetwork is built. Mean pooling underfits rich sets (Kim et al. 2019): attention
pooling lets the embedding weigh the examples by content.

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
from typing import Any, TypeVar, Union, cast

import torch
from torch import Tensor, nn

from torchhyper._checks import output_shape, positive_int, renamed
from torchhyper._registry import registrar

__all__ = [
    "Pool",
    "MeanPool",
    "SumPool",
    "MaxPool",
    "MomentsPool",
    "AttentionPool",
    "POOLS",
    "register_pool",
]


class Pool(nn.Module):
    r"""Base class of pools: encodings ``(*, B, H)`` to embeddings ``(*, H)``.

    A subclass implements :meth:`forward`, for any leading batch ``*``, invariant to the order
    of the ``B`` examples. One that reduces over several processes also overrides
    :meth:`local`.
    """

    def forward(self, e: Tensor) -> Tensor:
        r"""Pools sets of encodings ``(*, B, H)`` into embeddings ``(*, H)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def local(self, e: Tensor) -> Tensor:
        r"""Pools this process's share of each set alone, ``(*, B, H) -> (*, H)``.

        The hypernetwork calls it for sets it knows are held by one process (``per_sample``:
        each example is its own set). The default is :meth:`forward`.
        """
        out: Tensor = self(e)
        return out


POOLS: dict[str, type[Pool]] = {}
r"""The named pools: ``pool=NAME`` builds ``POOLS[NAME](in_features)``.

Filled by :func:`register_pool`. Validation, error messages, the experiments' configs, the tests
and the documentation all read it.
"""

P = TypeVar("P", bound=type[Pool])


def register_pool(name: str) -> Callable[[P], P]:
    r"""Registers a :class:`Pool` subclass under ``name``, so that ``pool=name`` builds it.

    The class is built as ``cls(in_features)``, with ``in_features`` the encoding width ``H``.

    Example:
        >>> @register_pool("softmax")
        ... class SoftmaxPool(Pool):
        ...     '''A mean weighted by the softmax of each example's first feature.'''
        ...     def __init__(self, in_features):
        ...         super().__init__()
        ...     def forward(self, e):
        ...         weights = e[..., :1].softmax(dim=-2)
        ...         return (weights * e).sum(dim=-2)
        >>> POOLS["softmax"](8)(torch.randn(3, 5, 8)).shape
        torch.Size([3, 8])
        >>> del POOLS["softmax"]  # (leave the registry as it was)

    Raises:
        ValueError: ``name`` is not an identifier, or is taken by another class.
        TypeError: The decorated object is not a :class:`Pool` subclass.
    """
    return cast(Callable[[P], P], registrar(POOLS, Pool, "pool", name))


def _expect_sets(pool: nn.Module, e: Any, width: int | None = None) -> None:
    if not isinstance(e, Tensor) or e.dim() < 2 or (width is not None and e.shape[-1] != width):
        got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
        want = "(*, B, H)" if width is None else f"(*, B, H) with H == {width}"
        raise ValueError(f"{type(pool).__name__} expects encodings {want}, got {got}")


class _Reduction(Pool):
    """A reduction over the set's dimension, with no parameters."""

    def __init__(self, in_features: int | None = None) -> None:
        super().__init__()
        self.in_features = None if in_features is None else positive_int("in_features", in_features)

    def forward(self, e: Tensor) -> Tensor:
        _expect_sets(self, e, self.in_features)
        return self.reduce(e)

    @staticmethod
    def reduce(e: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return "" if self.in_features is None else f"in_features={self.in_features}"


@register_pool("mean")
class MeanPool(_Reduction):
    r"""The mean over the set: ``(*, B, H) -> (*, H)``.

    Args:
        in_features: The encoding width ``H``; ``None`` takes any.
    """

    @staticmethod
    def reduce(e: Tensor) -> Tensor:
        return e.mean(dim=-2)


@register_pool("sum")
class SumPool(_Reduction):
    r"""The sum over the set, which keeps its size (Deep Sets): ``(*, B, H) -> (*, H)``.

    Args:
        in_features: The encoding width ``H``; ``None`` takes any.
    """

    @staticmethod
    def reduce(e: Tensor) -> Tensor:
        return e.sum(dim=-2)


@register_pool("max")
class MaxPool(_Reduction):
    r"""The feature-wise maximum over the set: ``(*, B, H) -> (*, H)``.

    Args:
        in_features: The encoding width ``H``; ``None`` takes any.
    """

    @staticmethod
    def reduce(e: Tensor) -> Tensor:
        return e.amax(dim=-2)


@register_pool("moments")
class MomentsPool(Pool):
    r"""The mean and the standard deviation of each feature over the set, mixed by a linear
    layer: ``(*, B, H) -> (*, H)``.

    A mean pools locations; what a fit often needs as well is the set's spread (its variances,
    its mixture's width). The standard deviation is ``sqrt(var + 1e-6)``, smooth at 0 (a set of
    one). At init the output is the mean plus a small random mix of the deviations.

    Args:
        in_features: The encoding width ``H``.

    References:
        | Deep Sets (Zaheer et al., 2017): sums of feature maps, of which moments are one
        | choice. https://arxiv.org/abs/1703.06114
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.mix = nn.Linear(2 * in_features, in_features)
        with torch.no_grad():  # start as the mean, plus a small mix of the deviations
            self.mix.weight[:, :in_features] = torch.eye(in_features)
            self.mix.weight[:, in_features:].mul_(0.1)
            self.mix.bias.zero_()

    def forward(self, e: Tensor) -> Tensor:
        _expect_sets(self, e, self.in_features)
        mean = e.mean(dim=-2)
        std = (e.var(dim=-2, correction=0) + 1e-6).sqrt()
        out: Tensor = self.mix(torch.cat([mean, std], dim=-1))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}"


@register_pool("attention")
class AttentionPool(Pool):
    r"""Pooling by multihead attention (PMA of the Set Transformer) with one learned seed query.

    With ``E = relu(W_e e + b_e)`` the encoded set, ``s`` a learned seed vector, and ``MHA`` a
    multihead attention of ``s`` over the set ``E``:

    ``a = LN(s + MHA(s, E, E))``, output ``LN(a + relu(W_f a + b_f))``.

    Softmax attention over the set is invariant to the order of its examples and takes any set
    size; a single query returns one embedding of the same width ``H``. With ``seeds = k > 1``
    (PMA_k), ``k`` queries attend to the set, each to what it learns to pick out, and a linear
    layer mixes their ``k`` outputs back to ``H``.

    Args:
        in_features: The encoding width ``H``.
        num_heads: Attention heads, as for :class:`torch.nn.MultiheadAttention`; must divide
            ``in_features``. Default: 4, 2 or 1, the largest that divides it.
        seeds: The number ``k`` of seed queries.

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

    @renamed(heads="num_heads")
    def __init__(self, in_features: int, *, num_heads: int | None = None, seeds: int = 1) -> None:
        super().__init__()
        width = positive_int("in_features", in_features)
        self.seeds = positive_int("seeds", seeds)
        if num_heads is None:
            num_heads = next(h for h in (4, 2, 1) if width % h == 0)
        num_heads = positive_int("num_heads", num_heads)
        if width % num_heads:
            raise ValueError(f"num_heads must divide in_features={width}, got {num_heads}")
        self.in_features = width
        self.num_heads = num_heads
        self.encode = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.seed = nn.Parameter(torch.randn(seeds, width) / width**0.5)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.feedforward = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.norm2 = nn.LayerNorm(width)
        self.mix = nn.Linear(seeds * width, width) if seeds > 1 else None

    def forward(self, e: Tensor) -> Tensor:
        _expect_sets(self, e, self.in_features)
        batch = e.shape[:-2]
        sets = e.reshape(-1, *e.shape[-2:])  # (S, B, H)
        keys = self.encode(sets)
        query = self.seed.expand(sets.shape[0], self.seeds, self.in_features)
        attended = self.attention(query, keys, keys, need_weights=False)[0]
        a = self.norm1(query + attended)
        out: Tensor = self.norm2(a + self.feedforward(a)).flatten(-2)  # (S, k H)
        if self.mix is not None:
            out = self.mix(out)
        return out.reshape(*batch, self.in_features)

    def extra_repr(self) -> str:
        seeds = f", seeds={self.seeds}" if self.seeds > 1 else ""
        return f"in_features={self.in_features}, num_heads={self.num_heads}{seeds}"


class _SetFunction(Pool):
    """A user's ``(B, H) -> (H,)`` callable for one set, mapped over the leading batch."""

    def __init__(self, function: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.function = function  # an nn.Module is registered, and so trained

    def forward(self, e: Tensor) -> Tensor:
        _expect_sets(self, e)
        if e.dim() == 2:
            return self.function(e)
        pooled = torch.vmap(self.function)(e.reshape(-1, *e.shape[-2:]))
        return pooled.reshape(*e.shape[:-2], *pooled.shape[1:])

    def extra_repr(self) -> str:
        return "" if isinstance(self.function, nn.Module) else repr(self.function)


def _make_pool(pool: Union[str, Pool, Callable[[Tensor], Tensor]], in_features: int) -> Pool:
    """The :class:`Pool` that ``pool=`` names, its output shape checked on a dummy set."""
    if isinstance(pool, str):
        if pool not in POOLS:
            raise ValueError(
                f"pool must be one of {list(POOLS)}, a Pool or a callable, got {pool!r}"
            )
        made: Pool = POOLS[pool](in_features)
    elif isinstance(pool, Pool):
        made = pool
    elif callable(pool):
        made = _SetFunction(pool)
    else:
        raise TypeError(
            f"pool must be a name of {list(POOLS)}, a Pool or a callable (B, H) -> (H,), "
            f"got {type(pool).__name__}"
        )
    _check_shape(made, in_features)
    return made


def _check_shape(pool: Pool, in_features: int) -> None:
    """Runs ``pool`` once on a dummy set ``(2, H)`` in eval mode (so that a pool over several
    processes stays local) and checks that it returns ``(H,)``."""
    ref = next(pool.parameters(), None)
    # Fixed values, not random ones: building a hypernetwork draws nothing more from the RNG.
    dummy = torch.linspace(-1.0, 1.0, 2 * in_features).reshape(2, in_features)
    if ref is not None:
        dummy = dummy.to(ref.device, ref.dtype if ref.is_floating_point() else None)
    what = f"pool must map a set (B, H) of encodings of width {in_features} to ({in_features},)"
    output_shape(pool, dummy, (in_features,), what)
