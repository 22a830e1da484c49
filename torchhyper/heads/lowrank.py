r"""Low-rank heads: :class:`LoRAHead` (fixed noise plus rank-r updates) and
:class:`LowRankHead` (purely low-rank matrices)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchhyper._checks import positive_int
from torchhyper.heads.dense import DenseHead
from torchhyper.heads.head import Head, _matrix_shape, _zero, register_head

__all__ = ["LoRAHead", "LowRankHead"]


@register_head("lora")
class LoRAHead(Head):
    r"""Generates each tensor as fixed noise plus a conditioned low-rank update,
    ``h = xi + A diag(c(z)) B^T / sqrt(rank)``, as LoRA adapts a frozen weight (Hu et al. 2021).

    Each tensor is viewed as a matrix ``(shape[0], prod(shape[1:]))`` (a vector ``(n,)`` as
    ``(n, 1)``, a scalar as ``(1, 1)``) with learned factors ``A (rows, r)`` and ``B (cols, r)``
    and coefficients ``c = Linear(z)`` predicted from the embedding. The noise ``xi`` is unit
    Gaussian, standardized tensor by tensor and regenerated from a stored seed (a one-integer
    buffer, so checkpoints stay small); ``B`` starts at zero. So at init each tensor is exactly a
    fresh draw of the downstream's default init, at exactly its init spread, and training learns
    rank-``r`` updates of it, conditioned on the embedding. The noise gives every generated
    matrix full rank, which a purely low-rank or chunked head lacks.

    On a base (``base="learned"`` or ``"frozen"``) the head drops its noise and generates the
    update ``A diag(c(z)) B^T / sqrt(rank)`` alone.

    Parameters: ``r * (rows + cols + H + 1)`` per tensor, ``r * (sum(rows + cols) + T (H + 1))``
    in all for ``T`` tensors. Cost: ``r * N`` multiply-adds forward and ``2 r N`` backward, in
    fused products that add the noise as they write. Memory: the noise, ``N`` values (a buffer,
    not a parameter).

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors.
        rank: The rank ``r`` of each tensor's update.

    References:
        | LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021)
        | https://arxiv.org/abs/2106.09685
    """

    seed: Tensor
    noise: Tensor | None  # None on a base (see zero_update_)

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]], *, rank: int = 8) -> None:
        super().__init__(in_features, shapes)
        positive_int("rank", rank)
        self.rank = rank
        self.matrix_shapes = [_matrix_shape(s) for s in self.shapes]
        self.left = nn.ParameterList(
            [nn.Parameter(torch.randn(m, rank)) for m, _ in self.matrix_shapes]
        )
        self.right = nn.ParameterList(
            [nn.Parameter(torch.zeros(n, rank)) for _, n in self.matrix_shapes]
        )
        self.coefficients = nn.Linear(in_features, rank * len(self.shapes))
        # Unit-variance coefficients for an embedding of unit variance.
        nn.init.normal_(self.coefficients.weight, std=1 / math.sqrt(in_features))
        nn.init.zeros_(self.coefficients.bias)
        seed = int(torch.randint(0, 2**62, ())) | _FLOAT32_NOISE
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("noise", _noise(seed, self.numels), persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        c = self.coefficients(z).unflatten(-1, (len(self.shapes), self.rank)) / math.sqrt(self.rank)
        lefts = [left * c[..., k, None, :] for k, left in enumerate(self.left)]  # (*, rows, r)
        shapes = self.matrix_shapes
        if not batch and not torch.compiler.is_compiling():
            out = _LowRankPlusNoise.apply(self.noise, self.numel, shapes, *lefts, *self.right)  # type: ignore[no-untyped-call]
            return cast(Tensor, out)
        noise = [None] * len(self.shapes) if self.noise is None else self.noise.split(self.numels)
        parts = []
        for left, right, xi, (rows, cols) in zip(lefts, self.right, noise, shapes):
            part = torch.matmul(left, right.T)
            parts.append((part if xi is None else part + xi.view(rows, cols)).flatten(-2))
        return torch.cat(parts, dim=-1)

    def zero_update_(self) -> bool:
        # An update to a base: no noise of its own, and B = 0 gives exactly zero.
        self.noise = None
        return _zero(*self.right)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.noise is not None:  # the noise is not saved: regenerate it from the loaded seed
            self.noise = _noise(int(self.seed), self.numels).to(self.noise.device, self.noise.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


class _LowRankPlusNoise(torch.autograd.Function):
    """``concat_k vec(noise_k + L_k R_k^T)`` for one embedding, written into one output: no
    ``torch.cat`` copy forward, views of the gradient backward, and ``R``'s gradient computed as
    ``L^T G``, the fast layout when the rank is small."""

    @staticmethod
    def forward(
        ctx: Any,
        noise: Tensor | None,
        numel: int,
        shapes: list[tuple[int, int]],
        *factors: Tensor,
    ) -> Tensor:
        lefts, rights = factors[: len(shapes)], factors[len(shapes) :]
        out = lefts[0].new_empty(numel)
        start = 0
        for (rows, cols), left, right in zip(shapes, lefts, rights):
            end = start + rows * cols
            if end > start:
                view = out[start:end].view(rows, cols)
                if noise is None:
                    torch.mm(left, right.T, out=view)
                else:
                    torch.addmm(noise[start:end].view(rows, cols), left, right.T, out=view)
            start = end
        ctx.shapes = shapes
        ctx.save_for_backward(*factors)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        shapes = ctx.shapes
        factors = ctx.saved_tensors
        lefts, rights = factors[: len(shapes)], factors[len(shapes) :]
        needs = ctx.needs_input_grad[3:]
        grad = grad.contiguous()
        grad_lefts: list[Tensor | None] = []
        grad_rights: list[Tensor | None] = []
        start = 0
        for k, ((rows, cols), left, right) in enumerate(zip(shapes, lefts, rights)):
            g = grad[start : start + rows * cols].view(rows, cols)
            start += rows * cols
            grad_lefts.append(g @ right if needs[k] else None)
            grad_rights.append((left.T @ g).T if needs[len(shapes) + k] else None)
        return None, None, None, *grad_lefts, *grad_rights


@register_head("lowrank")
class LowRankHead(Head):
    r"""Generates each matrix as a low-rank product ``A diag(c(z)) B^T``, with learned factors
    ``A`` and ``B`` and coefficients ``c`` predicted from the embedding (LoRA-style structured
    updates, Hu et al. 2021). Tensors of more than two dims are viewed as ``(shape[0], -1)``;
    vectors and scalars get a dense map, as they are small.

    Its generated matrices have rank at most ``rank``: it suits an update to pretrained weights,
    on a base (``HyperNetwork(..., base="frozen")``), rather than weights learned from scratch.

    Parameters: ``r (rows + cols + H + 1)`` per matrix, and ``(H + 1) n`` for the ``n`` values of
    the vectors and scalars. Cost: about ``r N`` multiply-adds.

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
        positive_int("rank", rank)
        self.rank = rank
        # Which tensors are matrices (two or more dims) and which vectors or scalars.
        self.matrix_index = [i for i, s in enumerate(self.shapes) if len(s) >= 2]
        self.vector_index = [i for i, s in enumerate(self.shapes) if len(s) < 2]
        matrices = [_matrix_shape(self.shapes[i]) for i in self.matrix_index]
        self.left = nn.ParameterList([nn.Parameter(torch.randn(m, rank)) for m, _ in matrices])
        self.right = nn.ParameterList([nn.Parameter(torch.randn(n, rank)) for _, n in matrices])
        self.coefficients = nn.Linear(in_features, rank * len(matrices)) if matrices else None
        small = [self.shapes[i] for i in self.vector_index]
        self.small = DenseHead(in_features, small) if small else None

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        parts: list[Tensor] = [z.new_empty(0)] * len(self.shapes)
        if self.coefficients is not None:
            c = self.coefficients(z).unflatten(-1, (len(self.matrix_index), self.rank))
            c = F.rms_norm(c, c.shape[-1:])  # unit scale, so values have unit variance at init
            for k, i in enumerate(self.matrix_index):
                a = self.left[k] * c[..., k, None, :]  # (*, rows, r)
                parts[i] = (a @ self.right[k].T / math.sqrt(self.rank)).reshape(*batch, -1)
        if self.small is not None:
            small = self.small(z).split([self.numels[i] for i in self.vector_index], dim=-1)
            for k, i in enumerate(self.vector_index):
                parts[i] = small[k]
        return torch.cat(parts, dim=-1)

    def zero_update_(self) -> bool:
        return _zero(*self.right) and (self.small is None or self.small.zero_update_())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


# Seeds with this bit set draw float32 noise; seeds below it come from checkpoints of 0.3.0 and
# earlier, whose noise was drawn in float64, and get it as it was.
_FLOAT32_NOISE = 1 << 62


def _noise(seed: int, numels: list[int]) -> Tensor:
    """Unit Gaussian noise, standardized tensor by tensor to zero mean and unit mean square, so
    that each generated tensor starts at exactly its init scale, not just in expectation."""
    generator = torch.Generator().manual_seed(seed)
    if seed < _FLOAT32_NOISE:
        noise = torch.randn(sum(numels), generator=generator, dtype=torch.float64)
        for part in noise.split(numels):
            if part.numel() > 1:
                part.sub_(part.mean())
                part.div_(part.square().mean().sqrt())
        return noise.float()
    # PyTorch's cascaded float32 sums keep the standardization exact to float32 rounding.
    noise = torch.randn(sum(numels), generator=generator)
    for part in noise.split(numels):
        if part.numel() > 1:
            part.sub_(part.mean())
            part.div_(torch.linalg.vector_norm(part) / part.numel() ** 0.5)
    return noise
