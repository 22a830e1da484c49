r"""The default head above the dense head's budget: :class:`HybridHead`, dense maps for the
small tensors and, for the rest, row scales plus a low-rank additive term, which moves any base
(zeros included)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchhyper._checks import positive_int
from torchhyper._record import _few
from torchhyper.heads.dense import DenseHead
from torchhyper.heads.head import (
    AUTO_BUDGET,
    Head,
    _has_zero_row,
    _matrix_shape,
    _require_bases,
    _scale_rows,
    _zero,
    register_head,
)

__all__ = ["HybridHead"]


@register_head("hybrid")
class HybridHead(Head):
    r"""Dense maps for the tensors that fit a parameter budget; for the others, a scale per row
    and, where scaling cannot move a tensor, a low-rank additive term.

    Tensors are taken smallest first (biases, norms, output layers, adapter factors: where
    conditioning tends to act, as in BitFit and head-only adaptation) and each gets a
    :class:`~torchhyper.heads.DenseHead` map, ``(H + 1)`` parameters per value, while the dense
    maps hold at most ``budget`` parameters. Every other tensor, viewed as a matrix
    ``(rows, cols)`` (a vector as ``(n, 1)``), is generated as

    ``theta_i(z) = (1 + gain_i g_i(z)) * base_i + spread_i gain_i A_i diag(c_i(z)) B_i^T / sqrt(r)``

    with ``g_i`` one scale per row (matrices only, as :class:`~torchhyper.heads.FiLMHead`), and
    a rank-``r`` additive term, as LoRA adapts a weight: learned factors ``A_i (rows, r)`` and
    ``B_i (cols, r)``, coefficients ``c_i`` predicted from the embedding. The additive term is
    given to the tensors that a row scale cannot move: vectors, and, when ``bases`` is given
    (the hypernetwork gives it), matrices with a row of zeros (PEFT's ``lora_B``,
    zero-initialized projections); without ``bases``, to every tensor; ``additive`` overrides
    both. ``g``, ``B`` and the dense maps start at zero, so the update starts at exactly zero,
    with gradients from the first step. Which tensors get a dense map and which the additive
    term is saved in the state dict (the buffer ``layout``), and a state dict of another layout
    is refused with the arguments that rebuild it.

    Parameters: ``(H + 1) n_d`` for the ``n_d`` values with dense maps, ``(H + 1) rows`` per other
    matrix, and ``r (rows + cols + H + 1)`` per tensor with the additive term. Cost per generated
    set: a product with the dense maps, one pass over the other values, and ``r`` multiply-adds
    per value of the tensors with the additive term.

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors.
        budget: The most parameters the dense maps may hold; 0 for none. Default:
            :data:`~torchhyper.heads.AUTO_BUDGET`.
        rank: The rank ``r`` of the additive terms.
        bases: The base of each tensor, shaped like ``shapes`` (``HyperNetwork`` passes them):
            only tensors with a row of zeros, and vectors, then get the additive term.
        additive: Which tensors get the additive term, one bool per tensor (vectors always
            do; a tensor with a dense map has no use for it).

    Example:
        >>> lora_b = torch.zeros(64, 8)  # PEFT's lora_B: every row zero
        >>> weight = torch.randn(64, 64)
        >>> head = HybridHead(16, [(64, 8), (64, 64)], budget=0, bases=[lora_b, weight])
        >>> head.scaled.additive  # a row scale moves the weight, not lora_B
        [True, False]
        >>> z = torch.randn(16)
        >>> spread, gain = torch.ones(2), torch.ones(2)
        >>> values = head.assemble(z, [lora_b.flatten(), weight.flatten()], spread, gain)
        >>> [tuple(v.shape) for v in values]  # flat values, (*, numel) per tensor
        [(512,), (4096,)]

    References:
        | HyperNetworks (Ha, Dai and Le, 2016) https://arxiv.org/abs/1609.09106
        | LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021)
        | https://arxiv.org/abs/2106.09685
        | BitFit (Ben Zaken, Ravfogel and Goldberg, 2021) https://arxiv.org/abs/2106.10199
    """

    needs_base = True
    layout: Tensor

    def __init__(
        self,
        in_features: int,
        shapes: Sequence[Sequence[int]],
        *,
        budget: int = AUTO_BUDGET,
        rank: int = 8,
        bases: Sequence[Tensor] | None = None,
        additive: Sequence[bool] | None = None,
    ) -> None:
        super().__init__(in_features, shapes)
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"budget must be an int (parameters), got {budget!r}")
        if budget < 0:
            raise ValueError(f"budget must be >= 0 (parameters; 0 for no dense maps), got {budget}")
        positive_int("rank", rank)
        self.budget = budget
        self.rank = rank
        # Smallest first, while the dense maps fit the budget (ties keep the tensors' order).
        order = sorted(range(len(self.shapes)), key=lambda i: self.numels[i])
        dense: set[int] = set()
        spent = 0
        for i in order:
            cost = (in_features + 1) * self.numels[i]
            if spent + cost > budget:
                break
            spent += cost
            dense.add(i)
        self.dense_index = sorted(dense)
        self.scaled_index = [i for i in range(len(self.shapes)) if i not in dense]
        flags = _additive(self.shapes, bases, additive)
        # What each tensor gets, saved in the state dict: 0 a dense map, 1 a row scale, 2 a row
        # scale and the additive term (see load_hint).
        layout = [0 if i in dense else 1 + flags[i] for i in range(len(self.shapes))]
        self.register_buffer("layout", torch.tensor(layout, dtype=torch.int8))
        dense_shapes = [self.shapes[i] for i in self.dense_index]
        self.dense = DenseHead(in_features, dense_shapes) if dense_shapes else None
        self.scaled = (
            _RowsPlusLowRank(
                in_features,
                [self.shapes[i] for i in self.scaled_index],
                rank=rank,
                additive=[flags[i] for i in self.scaled_index],
            )
            if self.scaled_index
            else None
        )
        self.zero_update_()

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], spread: Tensor, gain: Tensor
    ) -> list[Tensor]:
        _require_bases(self, bases)
        out: list[Tensor] = [z] * len(self.shapes)  # placeholders, all replaced
        for part, index in ((self.dense, self.dense_index), (self.scaled, self.scaled_index)):
            if part is None:
                continue
            values = part.assemble(z, [bases[i] for i in index], spread[index], gain[index])
            for i, v in zip(index, values):
                out[i] = v
        return out

    def load_hint(self, state_dict: Mapping[str, Any], prefix: str, names: list[str]) -> str:
        saved = state_dict.get(prefix + "layout")
        if not isinstance(saved, Tensor) or saved.shape != self.layout.shape:
            return ""
        theirs, ours = saved.tolist(), self.layout.tolist()
        if theirs == ours:
            return ""

        def parts(layout: list[int]) -> str:
            dense = [n for n, k in zip(names, layout) if k == 0]
            additive = [n for n, k in zip(names, layout) if k == 2]
            return f"dense maps for {_few(dense)}, an additive term for {_few(additive)}"

        flags = [k == 2 for k in theirs]
        return (
            f"the saved HybridHead gave {parts(theirs)}; this one gives {parts(ours)} (the "
            "dense maps follow the budget, the additive term the bases' rows of zeros at "
            "construction). Build the hypernetwork alike to load it: "
            f"head=functools.partial(HybridHead, budget=<the saved budget>, additive={flags})"
        )

    def zero_update_(self) -> bool:
        for part in (self.dense, self.scaled):
            if part is not None:
                part.zero_update_()
        return True

    def extra_repr(self) -> str:
        dense = sum(self.numels[i] for i in self.dense_index)
        return (
            f"{super().extra_repr()}, dense={len(self.dense_index)} tensors ({dense} values), "
            f"scaled={len(self.scaled_index)} tensors ({self.numel - dense} values), "
            f"rank={self.rank}, budget={self.budget}"
        )


def _additive(
    shapes: list[torch.Size],
    bases: Sequence[Tensor] | None,
    additive: Sequence[bool] | None,
) -> list[bool]:
    """Which tensors get the additive term: ``additive`` as given, else those whose base (if
    given) a row scale cannot move, else all."""
    if additive is not None:
        if isinstance(additive, (str, bytes)) or len(additive) != len(shapes):
            raise ValueError(
                f"additive must hold one bool per generated tensor ({len(shapes)}), "
                f"got {additive!r}"
            )
        return [bool(a) for a in additive]
    if bases is None:
        return [True] * len(shapes)
    wrong = [
        f"{i}: {tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__} vs {tuple(s)}"
        for i, (b, s) in enumerate(zip(bases, shapes))
        if not isinstance(b, Tensor) or b.shape != s
    ]
    if len(bases) != len(shapes) or wrong:
        raise ValueError(
            f"bases must hold one tensor per generated tensor, shaped like it ({len(shapes)}), "
            f"got {len(bases)}" + (f"; shapes differ at {'; '.join(wrong)}" if wrong else "")
        )
    # Vectors and scalars are shifted, not scaled; matrices need it for a row of zeros.
    return [b.dim() < 2 or _has_zero_row(b) for b in bases]


class _RowsPlusLowRank(Head):
    r"""The part of :class:`HybridHead` without dense maps: ``(1 + gain g(z)) * base`` for each
    matrix, plus ``spread gain A diag(c(z)) B^T / sqrt(r)`` for the tensors in ``additive``. The
    low-rank factors ``A`` and ``B`` of all those tensors sit in two flat parameters (few tensors
    for the optimizer)."""

    needs_base = True

    def __init__(
        self,
        in_features: int,
        shapes: Sequence[Sequence[int]],
        *,
        rank: int,
        additive: Sequence[bool],
    ) -> None:
        super().__init__(in_features, shapes)
        self.rank = rank
        self.matrix_shapes = [_matrix_shape(s) for s in self.shapes]
        # Row scales for the matrices; a vector's rows are its values, so it is only shifted.
        self.rows = [rows if cols > 1 else 0 for rows, cols in self.matrix_shapes]
        self.additive = [bool(a) or cols == 1 for a, (_, cols) in zip(additive, self.matrix_shapes)]
        # g: the embedding to a scale per row of every matrix.
        self.scales = nn.Linear(in_features, sum(self.rows)) if sum(self.rows) else None
        self.additive_index = [i for i, a in enumerate(self.additive) if a]
        low = [self.matrix_shapes[i] for i in self.additive_index]
        self.left: nn.Parameter | None = None
        self.right: nn.Parameter | None = None
        self.coefficients: nn.Linear | None = None
        if low:
            self.left = nn.Parameter(torch.randn(sum(rows for rows, _ in low) * rank))
            self.right = nn.Parameter(torch.zeros(sum(cols for _, cols in low) * rank))
            self.coefficients = nn.Linear(in_features, rank * len(low))
            # Coefficients of unit variance for an embedding of unit variance.
            nn.init.normal_(self.coefficients.weight, std=1 / math.sqrt(in_features))
            nn.init.zeros_(self.coefficients.bias)
        self.zero_update_()

    def assemble(
        self, z: Tensor, bases: Sequence[Tensor], spread: Tensor, gain: Tensor
    ) -> list[Tensor]:
        batch = z.shape[:-1]
        r = self.rank
        low = [self.matrix_shapes[i] for i in self.additive_index]
        if self.left is not None and self.right is not None and self.coefficients is not None:
            lefts = torch.split(self.left, [rows * r for rows, _ in low])
            rights = torch.split(self.right, [cols * r for _, cols in low])
            # (*, T', r): each additive tensor's coefficients, times its spread and gain.
            coef = (spread * gain / math.sqrt(r))[self.additive_index]
            c = self.coefficients(z).view(*batch, len(low), r) * coef.unsqueeze(-1)
        scales = (
            self.scales(z).split([n for n in self.rows if n], dim=-1)
            if self.scales is not None
            else ()
        )
        one = gain.new_ones(())
        out = []
        f = k = 0
        for i, (base, (rows, cols)) in enumerate(zip(bases, self.matrix_shapes)):
            base = base.view(rows, cols)
            value = base
            if self.rows[i]:
                row = torch.addcmul(one, scales[f], gain[i])  # 1 + gain g
                value = _scale_rows(base, row)
                f += 1
            if self.additive[i]:
                left = lefts[k].view(rows, r) * c[..., k, None, :]  # (*, rows, r)
                right = rights[k].view(cols, r)
                k += 1
                if batch:
                    value = value + torch.matmul(left, right.T)
                elif self.rows[i]:  # in place: the product's backward reads base and row
                    value = value.addmm_(left, right.T)
                else:
                    value = torch.addmm(value, left, right.T)
            elif batch and not self.rows[i]:
                value = value.expand(*batch, rows, cols)
            out.append(value.reshape(*batch, rows * cols))
        return out

    def zero_update_(self) -> bool:
        if self.scales is not None:
            _zero(self.scales.weight, self.scales.bias)
        if self.right is not None:
            _zero(self.right)
        return True
