r"""Pools over a set spread across ranks: the :class:`~torchhyper.pooling.Pool` s whose
:meth:`~torchhyper.pooling.Pool.local` differs from their ``forward``.

Each all-reduces the local reductions in one differentiable collective, in training mode under a
process group of more than one rank; otherwise it is the local pool it extends.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from torchhyper.pooling import MaxPool, MeanPool, Pool, SumPool, _expect_sets

__all__ = ["GlobalMean", "GlobalSum", "GlobalMax"]


def _active(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_reduce(tensor: Tensor, op: Any, group: Any) -> Tensor:
    """A contiguous copy of ``tensor``, reduced with ``op`` over the ranks of ``group``."""
    out = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sums a tensor over ranks. The backward also sums: the gradient of every rank's loss with
    respect to the global sum reaches every rank's local share. DDP's and FSDP2's averaging of the
    parameters' gradients then gives exactly the gradient of the mean of the ranks' losses."""

    @staticmethod
    def forward(tensor: Tensor, group: Any) -> Tensor:
        return _all_reduce(tensor, dist.ReduceOp.SUM, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, dist.ReduceOp.SUM, ctx.group), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], tensor: Tensor, group: Any) -> tuple[Tensor, Any]:
        # Under torch.vmap (e.g. HyperNetwork.per_set maps a pool over sets): one collective on
        # the whole batch, which every rank holds in the same size.
        return _batched(_AllReduceSum, in_dims[0], tensor, group)


class _AllReduceMax(torch.autograd.Function):
    """Maximum over ranks. The summed gradient goes to the ranks that hold the maximum, split
    evenly when several do (as :func:`torch.amax` splits it among ties)."""

    @staticmethod
    def forward(tensor: Tensor, group: Any) -> Tensor:
        return _all_reduce(tensor, dist.ReduceOp.MAX, group)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.group = inputs[1]
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        local, best = ctx.saved_tensors
        holds = (local == best).to(grad.dtype)
        summed = _all_reduce(torch.stack([grad, holds]), dist.ReduceOp.SUM, ctx.group)
        return summed[0] * holds / summed[1], None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], tensor: Tensor, group: Any) -> tuple[Tensor, Any]:
        return _batched(_AllReduceMax, in_dims[0], tensor, group)


def _batched(function: Any, dim: int | None, tensor: Tensor, group: Any) -> tuple[Tensor, Any]:
    if dim is None:
        return function.apply(tensor, group), None
    return function.apply(tensor.movedim(dim, 0), group), 0


class _Global(Pool):
    """A reduction over the set's examples on every rank: ``forward`` all-reduces, ``local``
    is the parent pool's reduction of this rank's share."""

    def __init__(self, in_features: int | None = None, *, group: Any = None) -> None:
        super().__init__(in_features)
        self.group = group

    def local(self, e: Tensor) -> Tensor:
        return super().forward(e)

    def forward(self, e: Tensor) -> Tensor:
        if not (self.training and _active(self.group)):
            return self.local(e)
        _expect_sets(self, e, getattr(self, "in_features", None))
        return self._all_reduce(e)

    def _all_reduce(self, e: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(
            s
            for s in (super().extra_repr(), "" if self.group is None else f"group={self.group}")
            if s
        )


class GlobalMean(_Global, MeanPool):
    r"""Mean of the encodings over a set spread across all ranks: ``(*, B, H) -> (*, H)``.

    Each rank holds ``B_r`` examples of the set. The sums of their encodings and the counts
    ``B_r`` are all-reduced (one collective, differentiable), so every rank gets the mean over
    all ``sum_r B_r`` examples, and gradients reach every rank's examples. Ranks may hold
    different numbers of examples, but the same leading batch ``*`` of sets. Without an
    initialized process group, with one process, or in ``eval()`` mode, it is the local mean,
    :class:`~torchhyper.pooling.MeanPool`, which is also its :meth:`local`.

    Args:
        in_features: The encoding width ``H``; ``None`` takes any.
        group: The process group to pool over; default: all ranks.

    Example:
        >>> from torchhyper import HyperNetwork
        >>> downstream = nn.Linear(4, 1)
        >>> hypernetwork = HyperNetwork(4, [64, 64], downstream, pool=GlobalMean())
        >>> hypernetwork(torch.randn(8, 4))["weight"].shape  # one process: the local mean
        torch.Size([1, 4])
    """

    def _all_reduce(self, e: Tensor) -> Tensor:
        sums = e.sum(dim=-2)
        count = torch.full((*sums.shape[:-1], 1), e.shape[-2], dtype=e.dtype, device=e.device)
        total = cast(Tensor, _AllReduceSum.apply(torch.cat([sums, count], dim=-1), self.group))  # type: ignore[no-untyped-call]
        return total[..., :-1] / total[..., -1:]


class GlobalSum(_Global, SumPool):
    r"""Sum of the encodings over a set spread across all ranks: ``(*, B, H) -> (*, H)``.

    The local sums are all-reduced (differentiable). Without an initialized process group, with
    one process, or in ``eval()`` mode, it is the local sum,
    :class:`~torchhyper.pooling.SumPool`, which is also its :meth:`local`.

    Args:
        in_features: The encoding width ``H``; ``None`` takes any.
        group: The process group to pool over; default: all ranks.
    """

    def _all_reduce(self, e: Tensor) -> Tensor:
        return cast(Tensor, _AllReduceSum.apply(e.sum(dim=-2), self.group))  # type: ignore[no-untyped-call]


class GlobalMax(_Global, MaxPool):
    r"""Feature-wise maximum over a set spread across all ranks: ``(*, B, H) -> (*, H)``.

    The local maxima are all-reduced with ``MAX``; the gradient goes to the rank(s) holding
    each maximum. Without an initialized process group, with one process, or in ``eval()``
    mode, it is the local maximum, :class:`~torchhyper.pooling.MaxPool`, which is also its
    :meth:`local`.

    Args:
        in_features: The encoding width ``H``; ``None`` takes any.
        group: The process group to pool over; default: all ranks.
    """

    def _all_reduce(self, e: Tensor) -> Tensor:
        return cast(Tensor, _AllReduceMax.apply(e.amax(dim=-2), self.group))  # type: ignore[no-untyped-call]
