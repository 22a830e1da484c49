r"""Heads: the last stage of a hypernetwork, from an embedding to every generated value.

A head maps an embedding ``z`` of shape ``(*, H)`` to raw values ``(*, N)``, the concatenation of
all generated tensors (flattened, in the order of the ``shapes`` it was built with). The
hypernetwork then scales and shifts each tensor to its init statistics, so every head has one
contract: **at init, given an embedding with zero mean and unit variance over its H features, its
raw values have zero mean and unit variance.** Heads are swapped with the ``head=`` argument of
:class:`~torchhyper.model.HyperNetwork`, which takes a name or any callable
``(in_features, shapes) -> Head``, e.g. ``functools.partial(ChunkedHead, chunk_size=512)``.
The scaling and shifting is :meth:`Head.assemble`, which a head may override to fuse it with its
own computation (:class:`DenseHead` folds it into its weights when generating many sets).

Trade-offs, with ``N`` generated values in ``T`` tensors, an embedding of width ``H`` and rank
``r`` (measured on a set-conditioned task in ``benchmarks/heads.py``):

* dense: ``(H + 1) N`` parameters, ``H N`` multiply-adds. Small downstreams (a GMM): the best
  fit, but about 80x the cost of training a 269 k MLP directly.
* LoRA (:class:`LoRAHead`): ``r (sum(rows + cols) + T (H + 1))`` parameters, ``r N``. Large
  downstreams: a fixed random base plus conditioned rank-``r`` updates.
* chunked: ``r (C + H + d) + d N / C`` parameters, ``r N``. The smallest heads, but its values
  have rank at most ``r + 1`` as a (chunks, C) matrix, and it fits poorly.
* low-rank: ``r (rows + cols)`` per matrix, ``r N``. Purely low-rank weights, e.g. updates
  with ``init="downstream"``.

``head="auto"`` takes the dense head up to 4096 generated values, and otherwise
:class:`LoRAHead` with the largest rank (at most 16) that keeps it within 0.125x the generated
values, leaving the rest of a 0.25x budget to the encoder. :func:`summary` reports the choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Head",
    "DenseHead",
    "ChunkedHead",
    "LowRankHead",
    "LoRAHead",
    "HeadFactory",
    "HEADS",
    "summary",
]


class Head(nn.Module):
    r"""Base class of heads: ``(*, in_features) -> (*, N)`` with ``N = sum(prod(shape))``.

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors, in output order.
    """

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.in_features = in_features
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        self.numel = sum(self.numels)

    def forward(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def assemble(self, z: Tensor, coef: Tensor, offsets: Sequence[Tensor]) -> list[Tensor]:
        r"""The generated values ``offset_i + coef_i * h_i``, tensor by tensor.

        Args:
            z: Embeddings, ``(*, H)``.
            coef: Per-tensor scales, ``(T,)``.
            offsets: Per tensor, a scalar or a flat ``(numel_i,)`` offset.

        Returns:
            Flat values ``(*, numel_i)`` per tensor.
        """
        return _assemble(self(z), coef, offsets, self.numels)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, tensors={len(self.shapes)}, numel={self.numel}"


def _assemble(raw: Tensor, coef: Tensor, offsets: Sequence[Tensor], numels: list[int]) -> list[Tensor]:
    # Tensor by tensor, with scalar scale and offset: no N-sized copies of them, whose backward
    # (an index_add over N values) cost as much as a small downstream's step.
    parts = raw.split(numels, dim=-1)
    return [torch.addcmul(o, h, c) for h, c, o in zip(parts, coef.unbind(), offsets)]


class DenseHead(Head):
    r"""One fused linear map from the embedding to every value, like the original torchhyper's
    per-tensor heads, but as a single matrix product.

    It costs ``(H + 1) N`` parameters: about 97 times the downstream for ``H = 96``. Use it for
    small downstreams, where it is the fastest to train.
    """

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__(in_features, shapes)
        self.weight = nn.Parameter(torch.randn(self.numel, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(self.numel))

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight, self.bias)

    def assemble(self, z: Tensor, coef: Tensor, offsets: Sequence[Tensor]) -> list[Tensor]:
        if z[..., 0].numel() <= self.in_features:
            return super().assemble(z, coef, offsets)
        # Many sets at once (per sample): folding the per-value scale and offset into the
        # weights costs N * H operations instead of B * N, forward and backward.
        scale = torch.cat([c.expand(n) for c, n in zip(coef.unbind(), self.numels)])
        offset = torch.cat([o.expand(n) for o, n in zip(offsets, self.numels)])
        weight = self.weight * scale.unsqueeze(-1)
        return list(F.linear(z, weight, torch.addcmul(offset, scale, self.bias)).split(self.numels, dim=-1))


class ChunkedHead(Head):
    r"""A shared generator that emits the values ``chunk_size`` at a time, each chunk conditioned
    on a learned chunk embedding (von Oswald et al. 2020).

    Chunk ``c`` gets ``a_c = norm(relu(U z + V e_c + b))`` of width ``rank``, then
    ``h_c = W a_c + w`` with ``W`` of shape ``(chunk_size, rank)``. Parameters grow with
    ``N / chunk_size * embedding_dim`` only, and the forward costs ``rank * N`` multiply-adds:
    with ``rank = 16`` this is small next to one forward of the downstream on a batch of 16 or more.

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors.
        chunk_size: Values per chunk ``C``.
        embedding_dim: Width ``d`` of the learned chunk embeddings.
        rank: Width ``r`` of the generator's hidden layer.

    References:
        | Continual learning with hypernetworks (von Oswald et al., 2020)
        | https://arxiv.org/abs/1906.00695
    """

    def __init__(
        self,
        in_features: int,
        shapes: Sequence[Sequence[int]],
        *,
        chunk_size: int = 1024,
        embedding_dim: int = 8,
        rank: int = 16,
    ) -> None:
        super().__init__(in_features, shapes)
        for name, value in (("chunk_size", chunk_size), ("embedding_dim", embedding_dim), ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.chunk_size = min(chunk_size, max(1, self.numel))
        self.chunks = -(-self.numel // self.chunk_size)
        self.embeddings = nn.Parameter(torch.randn(self.chunks, embedding_dim))
        self.mix = nn.Linear(in_features + embedding_dim, rank)
        self.weight = nn.Parameter(torch.randn(self.chunk_size, rank) / math.sqrt(rank))
        self.bias = nn.Parameter(torch.zeros(self.chunk_size))

    def forward(self, z: Tensor) -> Tensor:
        in_z, in_e = self.mix.weight.split([self.in_features, self.embeddings.shape[1]], dim=1)
        # The embedding's part is shared by every chunk: compute it once, not per chunk.
        a = F.linear(z, in_z, self.mix.bias).unsqueeze(-2) + self.embeddings @ in_e.T
        a = F.rms_norm(F.relu(a), a.shape[-1:])  # (*, chunks, rank), unit scale
        h = F.linear(a, self.weight, self.bias)  # (*, chunks, chunk_size)
        return h.flatten(-2)[..., : self.numel]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, chunks={self.chunks}"


class LowRankHead(Head):
    r"""Generates each matrix as a low-rank product ``A diag(c(z)) B^T``, with learned factors
    ``A`` and ``B`` and coefficients ``c`` predicted from the embedding (LoRA-style structured
    updates, Hu et al. 2021). Tensors of more than two dims are viewed as ``(shape[0], -1)``;
    vectors and scalars get a dense map, as they are small.

    Its generated matrices have rank at most ``rank``: best as an update to pretrained weights,
    with ``HyperNetwork(..., init="downstream")``, rather than for weights learned from scratch.

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors.
        rank: The rank ``r`` of each generated matrix.

    References:
        | LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021)
        | https://arxiv.org/abs/2106.09685
    """

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]], *, rank: int = 4) -> None:
        super().__init__(in_features, shapes)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.rank = rank
        self.matrices = [i for i, s in enumerate(self.shapes) if len(s) >= 2]
        self.vectors = [i for i, s in enumerate(self.shapes) if len(s) < 2]
        self.left = nn.ParameterList(
            [nn.Parameter(torch.randn(self.shapes[i][0], rank)) for i in self.matrices]
        )
        self.right = nn.ParameterList(
            [nn.Parameter(torch.randn(self.shapes[i][1:].numel(), rank)) for i in self.matrices]
        )
        self.coefficients = nn.Linear(in_features, rank * len(self.matrices)) if self.matrices else None
        small = [self.shapes[i] for i in self.vectors]
        self.small = DenseHead(in_features, small) if small else None

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        parts: list[Tensor] = [z.new_empty(0)] * len(self.shapes)
        if self.coefficients is not None:
            c = self.coefficients(z).unflatten(-1, (len(self.matrices), self.rank))
            c = F.rms_norm(c, c.shape[-1:])  # unit scale, so values have unit variance at init
            for k, i in enumerate(self.matrices):
                a = self.left[k] * c[..., k, None, :]  # (*, rows, r)
                parts[i] = (a @ self.right[k].T / math.sqrt(self.rank)).reshape(*batch, -1)
        if self.small is not None:
            small = self.small(z).split([self.shapes[i].numel() for i in self.vectors], dim=-1)
            for k, i in enumerate(self.vectors):
                parts[i] = small[k]
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


class LoRAHead(Head):
    r"""Generates each tensor as a fixed random base plus a conditioned low-rank update,
    ``h = xi + A diag(c(z)) B^T / sqrt(rank)``, as LoRA adapts a frozen base (Hu et al. 2021).

    Each tensor is viewed as a matrix ``(shape[0], prod(shape[1:]))`` (a vector ``(n,)`` as
    ``(n, 1)``, a scalar as ``(1, 1)``) with learned factors ``A (rows, r)`` and ``B (cols, r)``
    and coefficients ``c = Linear(z)`` predicted from the embedding. ``xi`` is unit Gaussian
    noise, standardized tensor by tensor and regenerated from a stored seed (a one-integer buffer,
    so checkpoints stay small); ``B`` starts at zero. So at init each tensor is exactly a fresh
    draw of the downstream's default init, at exactly its init scale, and training learns
    rank-``r`` updates of it, conditioned on the embedding. The base gives every generated
    matrix full rank: this is what lets a head far smaller than the downstream train it from
    scratch, where a purely low-rank or chunked head cannot fit a generic function.

    Parameters: ``r * (rows + cols + H + 1)`` per tensor, ``r * (sum(rows + cols) + T (H + 1))``
    in all for ``T`` tensors. Cost: ``r * N`` multiply-adds forward and ``2 r N`` backward, in
    fused products that add the base as they write. Memory: the base, ``N`` values (a buffer,
    not a parameter).

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors.
        rank: The rank ``r`` of each tensor's update.

    References:
        | LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021)
        | https://arxiv.org/abs/2106.09685
    """

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]], *, rank: int = 8) -> None:
        super().__init__(in_features, shapes)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.rank = rank
        self.matrices = [_as_matrix(s) for s in self.shapes]
        self.left = nn.ParameterList([nn.Parameter(torch.randn(m, rank)) for m, _ in self.matrices])
        self.right = nn.ParameterList([nn.Parameter(torch.zeros(n, rank)) for _, n in self.matrices])
        self.coefficients = nn.Linear(in_features, rank * len(self.shapes))
        # Unit-variance coefficients for an embedding of unit variance.
        nn.init.normal_(self.coefficients.weight, std=1 / math.sqrt(in_features))
        nn.init.zeros_(self.coefficients.bias)
        seed = int(torch.randint(0, 2**62, ()))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("noise", _noise(seed, self.numels), persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        c = self.coefficients(z).unflatten(-1, (len(self.shapes), self.rank)) / math.sqrt(self.rank)
        lefts = [left * c[..., k, None, :] for k, left in enumerate(self.left)]  # (*, rows, r)
        if not batch and not torch.compiler.is_compiling():
            return _LowRankPlusBase.apply(self.noise, self.matrices, *lefts, *self.right)
        parts = []
        for left, right, base, (rows, cols) in zip(
            lefts, self.right, self.noise.split(self.numels), self.matrices
        ):
            part = torch.matmul(left, right.T) + base.view(rows, cols)
            parts.append(part.flatten(-2))
        return torch.cat(parts, dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The base is not saved: regenerate it from the loaded seed.
        self.noise = _noise(int(self.seed), self.numels).to(self.noise.device, self.noise.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


class _LowRankPlusBase(torch.autograd.Function):
    """``concat_k vec(base_k + L_k R_k^T)`` for one embedding, written into one output: no
    ``torch.cat`` copy forward, views of the gradient backward, and ``R``'s gradient computed as
    ``L^T G``, the fast layout when the rank is small."""

    @staticmethod
    def forward(ctx, base: Tensor, matrices: list[tuple[int, int]], *factors: Tensor) -> Tensor:
        lefts, rights = factors[: len(matrices)], factors[len(matrices) :]
        out = torch.empty_like(base)
        start = 0
        for (rows, cols), left, right in zip(matrices, lefts, rights):
            end = start + rows * cols
            if end > start:
                view = out[start:end].view(rows, cols)
                torch.addmm(base[start:end].view(rows, cols), left, right.T, out=view)
            start = end
        ctx.matrices = matrices
        ctx.save_for_backward(*factors)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        matrices = ctx.matrices
        factors = ctx.saved_tensors
        lefts, rights = factors[: len(matrices)], factors[len(matrices) :]
        needs = ctx.needs_input_grad[2:]
        grad = grad.contiguous()
        grad_lefts: list[Tensor | None] = []
        grad_rights: list[Tensor | None] = []
        start = 0
        for k, ((rows, cols), left, right) in enumerate(zip(matrices, lefts, rights)):
            g = grad[start : start + rows * cols].view(rows, cols)
            start += rows * cols
            grad_lefts.append(g @ right if needs[k] else None)
            grad_rights.append((left.T @ g).T if needs[len(matrices) + k] else None)
        return None, None, *grad_lefts, *grad_rights


def _as_matrix(shape: torch.Size) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    return shape[0], shape[1:].numel()


def _noise(seed: int, numels: list[int]) -> Tensor:
    """Unit Gaussian noise, standardized tensor by tensor to zero mean and unit mean square, so
    that each generated tensor starts at exactly its init scale, not just in expectation."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(sum(numels), generator=generator, dtype=torch.float64)
    for part in noise.split(numels):
        if part.numel() > 1:
            part.sub_(part.mean())
            part.div_(part.square().mean().sqrt())
    return noise.float()


HeadFactory = Callable[[int, Sequence[Sequence[int]]], Head]

HEADS: dict[str, HeadFactory] = {
    "dense": DenseHead,
    "chunked": ChunkedHead,
    "lowrank": LowRankHead,
    "lora": LoRAHead,
}

# Up to this many generated values, head="auto" takes the dense head: at most about 400 k
# parameters for H = 96, the fastest to train and the best at fitting (a GMM, a small flow).
_AUTO_DENSE_MAX = 4096
# Above it, LoRAHead with the largest rank up to _AUTO_MAX_RANK whose parameters stay within
# _AUTO_HEAD_SHARE of the generated values: the rest of the 0.25x budget is the encoder's.
_AUTO_MAX_RANK = 16
_AUTO_HEAD_SHARE = 0.125


def _auto_head(in_features: int, shapes: Sequence[Sequence[int]]) -> Head:
    """``head="auto"``: dense for at most ``_AUTO_DENSE_MAX`` values, else :class:`LoRAHead`
    with the largest rank (at most 16) that keeps it within 0.125x the generated values."""
    sizes = [torch.Size(s) for s in shapes]
    numel = sum(s.numel() for s in sizes)
    if numel <= _AUTO_DENSE_MAX:
        return DenseHead(in_features, shapes)
    per_rank = sum(sum(_as_matrix(s)) + in_features + 1 for s in sizes)
    rank = int(min(_AUTO_MAX_RANK, max(1, _AUTO_HEAD_SHARE * numel // per_rank)))
    return LoRAHead(in_features, shapes, rank=rank)


def summary(hypernetwork: nn.Module) -> str:
    r"""A parameter-count report of a hypernetwork: its head, and its size against what it
    generates.

    Args:
        hypernetwork: A :class:`~torchhyper.HyperNetwork` (anything with a ``head`` submodule
            and a ``numel`` attribute, the number of generated values).

    Returns:
        A few lines of text, e.g.
        ``head: LoRAHead(rank=8) | generated: 269,322 values in 6 tensors | parameters: 57,278
        (0.213x generated): encoder 33,824, head 23,448, other 6``.

    Example:
        >>> hyper = HyperNetwork(4, [32, 64, 96], nn.Linear(300, 300))
        >>> print(summary(hyper).splitlines()[0])
        head: LoRAHead(rank=8)
    """
    head = getattr(hypernetwork, "head", None)
    if not isinstance(head, nn.Module) or not hasattr(hypernetwork, "numel"):
        raise TypeError(
            f"hypernetwork must be a HyperNetwork (with a head and numel), got {type(hypernetwork).__name__}"
        )
    parts: dict[str, int] = {}
    for name, p in hypernetwork.named_parameters():
        owner = name.split(".")[0]
        parts[owner] = parts.get(owner, 0) + p.numel()
    total = sum(parts.values())
    options = ", ".join(
        f"{k}={getattr(head, k)}" for k in ("rank", "chunk_size") if hasattr(head, k)
    )
    tensors = len(getattr(head, "shapes", [])) or "?"
    detail = ", ".join(f"{k} {v:,}" for k, v in parts.items())
    return (
        f"head: {type(head).__name__}({options})\n"
        f"generated: {hypernetwork.numel:,} values in {tensors} tensors\n"
        f"parameters: {total:,} ({total / hypernetwork.numel:.3g}x generated): {detail}"
    )


def _make_head(
    head: Union[str, HeadFactory], in_features: int, shapes: Sequence[Sequence[int]]
) -> Head:
    if isinstance(head, str):
        factories = {"auto": _auto_head, **HEADS}
        if head not in factories:
            raise ValueError(f"head must be one of {sorted(factories)} or a callable, got {head!r}")
        head = factories[head]
    if not callable(head):
        raise TypeError(f"head must be a name or a callable (in_features, shapes) -> Head, got {head!r}")
    module = head(in_features, shapes)
    if not isinstance(module, nn.Module):
        raise TypeError(f"head factory must return an nn.Module, got {type(module).__name__}")
    return module
