r"""Heads: the last stage of a hypernetwork, from an embedding to every generated tensor.

A hypernetwork generates each tensor from a *base* and an embedding ``z`` of shape ``(*, H)``.
The head decides how, through one method, :meth:`Head.assemble`, which maps ``z``, the bases,
and the per-tensor ``scale`` and learned ``gain`` to the flat generated tensors
``(*, numel_i)``. Most heads compute raw values ``h = head(z)`` of shape ``(*, N)`` (every
tensor flattened and concatenated, in the order of ``shapes``), and the default assembly is
``base_i + scale_i * gain_i * h_i``: ``gain`` sets the size of each tensor's update.

The base is chosen with ``HyperNetwork(..., base=)``:

* ``"learned"`` (the default) and ``"frozen"``: the downstream's own current values, copied
  into a trained or a fixed (``requires_grad=False``) parameter, and the head generates an
  *update*. Every built-in head then
  starts at exactly zero (:meth:`Head.zero_update_`), so the hypernetwork starts at the
  downstream's values.
* ``"none"``: the original torchhyper's full generation. The base is the scalar mean of each
  tensor's default init, ``scale`` its std, and the head's raw values must have **zero mean and
  unit variance at init, given an embedding of zero mean and unit variance over its H features.**

Heads are swapped with ``head=``, which takes a name of :data:`HEADS`, ``"auto"``, or any
callable ``(in_features, shapes) -> module``, e.g. ``functools.partial(LoRAHead, rank=16)``. A
module that is not a :class:`Head` must map ``(*, H) -> (*, N)``; it is wrapped once, and its
output width is checked on a dummy embedding when the hypernetwork is built.

Trade-offs, with ``N`` generated values in ``T`` tensors of ``R`` rows in all (a tensor's rows
are its first dimension), an embedding of width ``H`` and rank ``r``; measured against training
the downstream directly in ``benchmarks/quality.py`` and ``benchmarks/heads.py``:

* FiLM (:class:`FiLMHead`): ``(H + 1) (R + V)`` parameters (``R`` rows of the matrices,
  ``V`` values of the vectors), ``N`` multiply-adds. Scales each row of each matrix by
  ``1 + g(z)`` and shifts vectors: the ``auto`` choice with a base above 4096 values.
* dense: ``(H + 1) N`` parameters, ``H N`` multiply-adds. Small downstreams (a GMM, a flow): the
  best fit, but about 80x the cost of training a 269 k MLP directly.
* LoRA (:class:`LoRAHead`): ``r (sum(rows + cols) + T (H + 1))`` parameters, ``r N``. With no
  base, a fixed random base plus conditioned rank-``r`` updates.
* chunked: ``r (C + H + d) + d N / C`` parameters, ``r N``. The smallest heads, but its values
  have rank at most ``r + 1`` as a (chunks, C) matrix, and it fits poorly.
* low-rank: ``r (rows + cols)`` per matrix, ``r N``. Purely low-rank updates.
* none (:class:`NoUpdate`): no parameters; every tensor is its base, so a learned base trains
  exactly as the downstream trained directly.

``head="auto"`` takes the dense head up to 4096 generated values. Above that it takes
:class:`FiLMHead` on a base and, with ``base="none"``, :class:`LoRAHead` with the largest rank
(at most 16) that keeps it within 0.125x the generated values. :func:`summary` reports the choice.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Head",
    "FiLMHead",
    "NoUpdate",
    "DenseHead",
    "ChunkedHead",
    "LowRankHead",
    "LoRAHead",
    "HeadFactory",
    "HEADS",
    "HEAD_NAMES",
    "summary",
]


class Head(nn.Module):
    r"""Base class of heads: ``(*, in_features) -> (*, N)`` with ``N = sum(prod(shape))``.

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors, in output order.
    """

    #: Whether the head only modulates a base (it cannot generate tensors from scratch).
    needs_base: bool = False

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.in_features = in_features
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        self.numel = sum(self.numels)

    def forward(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], scale: Tensor, gain: Tensor
    ) -> list[Tensor]:
        r"""The generated values ``base_i + scale_i * gain_i * h_i``, tensor by tensor.

        Args:
            z: Embeddings, ``(*, H)``.
            bases: Per tensor, a scalar (``base="none"``) or the flat ``(numel_i,)`` base.
            scale: Per-tensor scales, ``(T,)``: the std of a tensor's default init
                (``base="none"``) or the root mean square of its base.
            gain: Per-tensor learned gains, ``(T,)``.

        Returns:
            Flat values ``(*, numel_i)`` per tensor.
        """
        return _assemble(self(z), scale * gain, bases, self.numels)

    def zero_update_(self) -> bool:
        r"""Makes the head's raw values exactly zero for every embedding, in place, keeping it
        trainable: the start of an update to a base. Returns whether the head can (the base
        class cannot; the hypernetwork then starts that head's per-tensor gains at zero)."""
        return False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, tensors={len(self.shapes)}, numel={self.numel}"


def _assemble(
    raw: Tensor, coef: Tensor, bases: Sequence[Tensor], numels: list[int]
) -> list[Tensor]:
    # Tensor by tensor, with scalar coefficients: no N-sized copies of them, whose backward
    # (an index_add over N values) cost as much as a small downstream's step.
    parts = raw.split(numels, dim=-1)
    return [torch.addcmul(b, h, c) for h, c, b in zip(parts, coef.unbind(), bases)]


class _ModuleHead(Head):
    """Any module ``(*, H) -> (*, N)`` that a head factory returned, as a :class:`Head`."""

    def __init__(
        self, module: nn.Module, in_features: int, shapes: Sequence[Sequence[int]]
    ) -> None:
        super().__init__(in_features, shapes)
        self.module = module

    def forward(self, z: Tensor) -> Tensor:
        return self.module(z)


class NoUpdate(Head):
    r"""No update and no parameters: every generated tensor is its base.

    With ``base="learned"`` the hypernetwork then trains the downstream's parameters exactly as
    training the downstream directly does, step for step; with ``base="frozen"`` it generates the
    downstream as it is. It needs a base.
    """

    needs_base = True

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], scale: Tensor, gain: Tensor
    ) -> list[Tensor]:
        batch = z.shape[:-1]
        return [b.expand(*batch, b.numel()) if batch else b for b in bases]

    def zero_update_(self) -> bool:
        return True


class FiLMHead(Head):
    r"""Modulates a base: each row of each matrix is scaled, ``theta_i(z) = (1 + gain_i g_i(z))
    * base_i``, and each vector is shifted, ``theta_i(z) = base_i + scale_i gain_i s_i(z)``.

    A tensor's rows are its first dimension (a Linear's or a Conv's output channels); vectors
    (biases, norm scales) and scalars are shifted value by value, in units of their spread, so
    that a zero bias moves too. ``g`` and ``s`` are one linear map of the embedding, zero at
    init, so the hypernetwork starts at the base. This is the weight-scaling hypernetwork of Ha
    et al. 2016 and FiLM's feature-wise modulation (Perez et al. 2018), applied to the weights.

    Learning dynamics: ``g`` moves at the rate of a dense head's output, so a generated weight
    moves by about ``|base| * lr * ||z - center||_1`` per Adam step: the rate of a dense head, on
    ``(H + 1) (R + V)`` parameters instead of ``(H + 1) N``, with ``R`` the rows of the
    matrices and ``V`` the values of the vectors.

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors.

    References:
        | HyperNetworks (Ha, Dai and Le, 2016) https://arxiv.org/abs/1609.09106
        | FiLM: Visual Reasoning with a General Conditioning Layer (Perez et al., 2018)
        | https://arxiv.org/abs/1709.07871
    """

    needs_base = True

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__(in_features, shapes)
        self.matrices = [_as_matrix(s) for s in self.shapes]
        # Per tensor: a scale per row of a matrix, or a shift per value of a vector.
        self.widths = [rows for rows, _ in self.matrices]
        self.linear = nn.Linear(in_features, sum(self.widths))
        # For the whole output at once: which tensor each value belongs to, whether that
        # tensor is a vector, and the 1 of a row's factor 1 + gain * g (0 for a vector's shift).
        vector = torch.tensor([cols == 1 for _, cols in self.matrices])
        owner = torch.repeat_interleave(torch.arange(len(self.widths)), torch.tensor(self.widths))
        self.register_buffer("vector", vector, persistent=False)
        self.register_buffer("owner", owner, persistent=False)
        self.register_buffer("one", (~vector[owner]).float(), persistent=False)
        self.zero_update_()

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], scale: Tensor, gain: Tensor
    ) -> list[Tensor]:
        if bases and bases[0].dim() == 0:  # base="none" passes scalar offsets
            raise ValueError(
                "FiLMHead modulates a base: build the hypernetwork with base='learned' or 'frozen'"
            )
        batch = z.shape[:-1]
        # One pass over all rows and vector values: 1 + gain * g for rows, scale * gain * s
        # for vectors (a handful of kernels, whatever the number of tensors).
        coef = torch.where(self.vector, scale * gain, gain)[self.owner]
        factors = torch.addcmul(self.one, self.linear(z), coef).split(self.widths, dim=-1)
        out = []
        for f, base, (rows, cols) in zip(factors, bases, self.matrices):
            if cols == 1:
                out.append(base + f)
            else:
                out.append((base.view(rows, cols) * f.unsqueeze(-1)).view(*batch, rows * cols))
        return out

    def zero_update_(self) -> bool:
        return _zero(self.linear.weight, self.linear.bias)


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

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], scale: Tensor, gain: Tensor
    ) -> list[Tensor]:
        if z[..., 0].numel() <= self.in_features:
            return super().assemble(z, bases, scale, gain)
        # Many sets at once (per sample): folding the per-value scale and base into the
        # weights costs N * H operations instead of B * N, forward and backward.
        scale = torch.cat([c.expand(n) for c, n in zip((scale * gain).unbind(), self.numels)])
        base = torch.cat([b.expand(n) for b, n in zip(bases, self.numels)])
        weight = self.weight * scale.unsqueeze(-1)
        return list(
            F.linear(z, weight, torch.addcmul(base, scale, self.bias)).split(self.numels, dim=-1)
        )

    def zero_update_(self) -> bool:
        return _zero(self.weight, self.bias)


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
        for name, value in (
            ("chunk_size", chunk_size),
            ("embedding_dim", embedding_dim),
            ("rank", rank),
        ):
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

    def zero_update_(self) -> bool:
        return _zero(self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, chunks={self.chunks}"


class LowRankHead(Head):
    r"""Generates each matrix as a low-rank product ``A diag(c(z)) B^T``, with learned factors
    ``A`` and ``B`` and coefficients ``c`` predicted from the embedding (LoRA-style structured
    updates, Hu et al. 2021). Tensors of more than two dims are viewed as ``(shape[0], -1)``;
    vectors and scalars get a dense map, as they are small.

    Its generated matrices have rank at most ``rank``: best as an update to pretrained weights,
    on a base (``HyperNetwork(..., base="frozen")``), rather than for weights learned from scratch.

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
        self.coefficients = (
            nn.Linear(in_features, rank * len(self.matrices)) if self.matrices else None
        )
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

    def zero_update_(self) -> bool:
        return _zero(*self.right) and (self.small is None or self.small.zero_update_())

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
        self.right = nn.ParameterList(
            [nn.Parameter(torch.zeros(n, rank)) for _, n in self.matrices]
        )
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
            return _LowRankPlusBase.apply(
                self.noise, self.numel, self.matrices, *lefts, *self.right
            )
        bases = [None] * len(self.shapes) if self.noise is None else self.noise.split(self.numels)
        parts = []
        for left, right, base, (rows, cols) in zip(lefts, self.right, bases, self.matrices):
            part = torch.matmul(left, right.T)
            parts.append((part if base is None else part + base.view(rows, cols)).flatten(-2))
        return torch.cat(parts, dim=-1)

    def zero_update_(self) -> bool:
        # An update to a base: no random base of its own, and B = 0 gives exactly zero.
        self.noise = None
        return _zero(*self.right)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.noise is not None:  # the base is not saved: regenerate it from the loaded seed
            self.noise = _noise(int(self.seed), self.numels).to(self.noise.device, self.noise.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


class _LowRankPlusBase(torch.autograd.Function):
    """``concat_k vec(base_k + L_k R_k^T)`` for one embedding, written into one output: no
    ``torch.cat`` copy forward, views of the gradient backward, and ``R``'s gradient computed as
    ``L^T G``, the fast layout when the rank is small."""

    @staticmethod
    def forward(
        ctx, base: Tensor | None, numel: int, matrices: list[tuple[int, int]], *factors: Tensor
    ) -> Tensor:
        lefts, rights = factors[: len(matrices)], factors[len(matrices) :]
        out = lefts[0].new_empty(numel)
        start = 0
        for (rows, cols), left, right in zip(matrices, lefts, rights):
            end = start + rows * cols
            if end > start:
                view = out[start:end].view(rows, cols)
                if base is None:
                    torch.mm(left, right.T, out=view)
                else:
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
        needs = ctx.needs_input_grad[3:]
        grad = grad.contiguous()
        grad_lefts: list[Tensor | None] = []
        grad_rights: list[Tensor | None] = []
        start = 0
        for k, ((rows, cols), left, right) in enumerate(zip(matrices, lefts, rights)):
            g = grad[start : start + rows * cols].view(rows, cols)
            start += rows * cols
            grad_lefts.append(g @ right if needs[k] else None)
            grad_rights.append((left.T @ g).T if needs[len(matrices) + k] else None)
        return None, None, None, *grad_lefts, *grad_rights


def _zero(*params: Tensor) -> bool:
    """Zeroes ``params`` in place (the output layer of an update that starts at zero)."""
    with torch.no_grad():
        for p in params:
            p.zero_()
    return True


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


HeadFactory = Callable[[int, Sequence[Sequence[int]]], nn.Module]

#: The named heads: ``head=NAME`` takes ``HEADS[NAME](in_features, shapes)``. Register a head
#: by adding it here; validation, the experiments' configs and the tests read this dict.
HEADS: dict[str, HeadFactory] = {
    "film": FiLMHead,
    "dense": DenseHead,
    "lora": LoRAHead,
    "chunked": ChunkedHead,
    "lowrank": LowRankHead,
    "none": NoUpdate,
}
#: Every name ``head=`` takes: ``"auto"`` (see :func:`auto_head`) and the keys of :data:`HEADS`.
HEAD_NAMES: tuple[str, ...] = ("auto", *HEADS)

# Up to this many generated values, head="auto" takes the dense head: at most about 400 k
# parameters for H = 96, the fastest to train and the best at fitting (a GMM, a small flow).
_AUTO_DENSE_MAX = 4096
# With no base and above it, LoRAHead with the largest rank up to _AUTO_MAX_RANK whose
# parameters stay within _AUTO_HEAD_SHARE of the generated values.
_AUTO_MAX_RANK = 16
_AUTO_HEAD_SHARE = 0.125


def auto_head(in_features: int, shapes: Sequence[Sequence[int]], *, base: bool = True) -> Head:
    r"""The head ``head="auto"`` builds: :class:`DenseHead` for at most 4096 generated values;
    above that :class:`FiLMHead` on a base, or with no base a :class:`LoRAHead` with the
    largest rank (at most 16) that keeps it within 0.125x the generated values.

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors.
        base: Whether the hypernetwork has a base (``base="learned"`` or ``"frozen"``).
    """
    sizes = [torch.Size(s) for s in shapes]
    numel = sum(s.numel() for s in sizes)
    if numel <= _AUTO_DENSE_MAX:
        return DenseHead(in_features, shapes)
    if base:
        return FiLMHead(in_features, shapes)
    per_rank = sum(sum(_as_matrix(s)) + in_features + 1 for s in sizes)
    rank = int(min(_AUTO_MAX_RANK, max(1, _AUTO_HEAD_SHARE * numel // per_rank)))
    return LoRAHead(in_features, shapes, rank=rank)


def summary(hypernetwork: nn.Module) -> str:
    r"""A parameter-count report of a hypernetwork: its head, its base, and its size against
    what it generates.

    Args:
        hypernetwork: A :class:`~torchhyper.HyperNetwork` or
            :class:`~torchhyper.EmbeddingHyperNetwork`.

    Returns:
        A few lines of text: the head, the base, the generated values, and the trained
        parameters by submodule.

    Example:
        >>> hyper = HyperNetwork(4, [32, 64, 96], nn.Linear(300, 300))
        >>> print(summary(hyper).splitlines()[:2])
        ['head: FiLMHead()', 'base: learned (90,300 values, trained)']
    """
    head = getattr(hypernetwork, "head", None)
    if not isinstance(head, nn.Module) or not hasattr(hypernetwork, "numel"):
        raise TypeError(
            f"hypernetwork must be a HyperNetwork (with a head and numel), got {type(hypernetwork).__name__}"
        )
    parts: dict[str, int] = {}
    for name, p in hypernetwork.named_parameters():
        if p.requires_grad:
            owner = name.split(".")[0]
            parts[owner] = parts.get(owner, 0) + p.numel()
    total = sum(parts.values())
    options = ", ".join(
        f"{k}={getattr(head, k)}" for k in ("rank", "chunk_size") if hasattr(head, k)
    )
    tensors = len(getattr(head, "shapes", [])) or "?"
    detail = ", ".join(f"{k} {v:,}" for k, v in parts.items())
    base = getattr(hypernetwork, "base", "none")
    how = {"learned": "trained", "frozen": "fixed"}.get(base)
    return (
        f"head: {type(head).__name__}({options})\n"
        + (f"base: {base} ({hypernetwork.numel:,} values, {how})\n" if how else "base: none\n")
        + f"generated: {hypernetwork.numel:,} values in {tensors} tensors\n"
        f"trained parameters: {total:,} ({total / hypernetwork.numel:.3g}x generated): {detail}"
    )


def _make_head(
    head: Union[str, HeadFactory], in_features: int, shapes: Sequence[Sequence[int]], *, base: bool
) -> Head:
    """Builds ``head=`` as a :class:`Head`, wrapping any other module once, and checks it."""
    if isinstance(head, str):
        if head not in HEAD_NAMES:
            raise ValueError(f"head must be one of {list(HEAD_NAMES)} or a callable, got {head!r}")
        factory: HeadFactory = (
            functools.partial(auto_head, base=base) if head == "auto" else HEADS[head]
        )
    elif callable(head):
        factory = head
    else:
        raise TypeError(
            f"head must be a name or a callable (in_features, shapes) -> Head, got {head!r}"
        )
    module = factory(in_features, shapes)
    if not isinstance(module, nn.Module):
        raise TypeError(f"head factory must return an nn.Module, got {type(module).__name__}")
    if not isinstance(module, Head):
        numel = sum(torch.Size(s).numel() for s in shapes)
        ref = next(module.parameters(), None)
        dummy = torch.zeros(in_features) if ref is None else ref.new_zeros(in_features)
        try:
            with torch.no_grad():
                out = module(dummy)
        except Exception as error:
            raise TypeError(
                f"head factory returned {type(module).__name__}, which must map an embedding "
                f"(*, {in_features}) to (*, {numel}) values; calling it on zeros({in_features}) "
                f"raised {type(error).__name__}: {error}"
            ) from error
        if not isinstance(out, Tensor) or out.shape != (numel,):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"head factory returned {type(module).__name__}, which must map an embedding "
                f"({in_features},) to ({numel},) values (one per generated value), got {got}"
            )
        module = _ModuleHead(module, in_features, shapes)
    if module.needs_base and not base:
        raise ValueError(
            f"head {type(module).__name__} modulates a base, but base='none': "
            "use base='learned' or 'frozen', or a head that generates tensors (e.g. 'dense')"
        )
    return module
