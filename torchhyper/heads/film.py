r"""Heads that modulate a base: :class:`FiLMHead` (row scales and shifts) and :class:`NoUpdate`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchhyper.heads.head import (
    Head,
    _matrix_shape,
    _require_bases,
    _scale_rows,
    _zero,
    register_head,
)

__all__ = ["FiLMHead", "NoUpdate"]


@register_head("film")
class FiLMHead(Head):
    r"""Modulates a base: each row of each matrix is scaled, ``theta_i(z) = (1 + gain_i g_i(z))
    * base_i``, and each vector is shifted, ``theta_i(z) = base_i + spread_i gain_i s_i(z)``.

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
    scales_base = True
    vector: Tensor
    owner: Tensor
    one: Tensor

    def __init__(self, in_features: int, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__(in_features, shapes)
        self.matrix_shapes = [_matrix_shape(s) for s in self.shapes]
        # Per tensor: a scale per row of a matrix, or a shift per value of a vector.
        self.widths = [rows for rows, _ in self.matrix_shapes]
        self.linear = nn.Linear(in_features, sum(self.widths))
        # For the whole output at once: which tensor each value belongs to, whether that
        # tensor is a vector, and the 1 of a row's scale 1 + gain * g (0 for a vector's shift).
        vector = torch.tensor([cols == 1 for _, cols in self.matrix_shapes])
        owner = torch.repeat_interleave(torch.arange(len(self.widths)), torch.tensor(self.widths))
        self.register_buffer("vector", vector, persistent=False)
        self.register_buffer("owner", owner, persistent=False)
        self.register_buffer("one", (~vector[owner]).float(), persistent=False)
        self.zero_update_()

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], spread: Tensor, gain: Tensor
    ) -> list[Tensor]:
        _require_bases(self, bases)
        batch = z.shape[:-1]
        # One pass over all rows and vector values: 1 + gain * g for rows, spread * gain * s
        # for vectors (a handful of kernels, whatever the number of tensors).
        coef = torch.where(self.vector, spread * gain, gain)[self.owner]
        parts = torch.addcmul(self.one, self.linear(z), coef).split(self.widths, dim=-1)
        out = []
        for part, base, (rows, cols) in zip(parts, bases, self.matrix_shapes):
            if cols == 1:  # a vector's shift
                out.append(base + part)
            else:  # a matrix's row scales
                out.append(_scale_rows(base.view(rows, cols), part).view(*batch, rows * cols))
        return out

    def zero_update_(self) -> bool:
        return _zero(self.linear.weight, self.linear.bias)


@register_head("no_update")
class NoUpdate(Head):
    r"""No update and no parameters: every generated tensor is its base.

    With ``base="learned"`` the hypernetwork then trains the downstream's parameters exactly as
    training the downstream directly does, step for step; with ``base="frozen"`` it generates the
    downstream as it is. It needs a base.
    """

    needs_base = True

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], spread: Tensor, gain: Tensor
    ) -> list[Tensor]:
        _require_bases(self, bases)
        batch = z.shape[:-1]
        return [b.expand(*batch, b.numel()) if batch else b for b in bases]

    def zero_update_(self) -> bool:
        return True
