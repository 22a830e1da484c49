r"""Building ``head=``: the ``"auto"`` policy (:func:`auto_head`), names and factories
(:func:`_make_head`), and the report of a hypernetwork's parts (:func:`summary`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any, Union, cast

import torch
from torch import Tensor, nn

from torchhyper._checks import output_shape
from torchhyper.heads.dense import DenseHead
from torchhyper.heads.head import (
    _RENAMED,
    AUTO_BUDGET,
    HEADS,
    Head,
    HeadFactory,
    _matrix_shape,
    _ModuleHead,
    head_names,
)
from torchhyper.heads.hybrid import HybridHead
from torchhyper.heads.lowrank import LoRAHead

__all__ = ["auto_head", "summary"]


# The LoRAHead of head="auto" with no base, above the budget (see auto_head).
_AUTO_MAX_RANK = 16
_AUTO_HEAD_SHARE = 0.125


def auto_head(
    in_features: int,
    shapes: Sequence[Sequence[int]],
    *,
    base: bool = True,
    bases: Sequence[Tensor] | None = None,
) -> Head:
    r"""The head ``head="auto"`` builds, decided by what a dense head would cost.

    A dense head costs ``(H + 1) N`` parameters for ``N`` generated values. Within the budget,
    :data:`~torchhyper.heads.AUTO_BUDGET`, it is :class:`DenseHead`. Above it, on a base,
    :class:`HybridHead` with that budget: dense maps for the smallest tensors that fit, a scale
    per row for the others, plus a low-rank additive term where scaling cannot move a tensor (a
    zero base). With no base, a :class:`LoRAHead` with the largest rank (at most 16) whose
    parameters stay within an eighth of the generated values. The returned head's ``reason``
    says which and why (:func:`summary` and the hypernetwork's repr show it).

    Args:
        in_features: The embedding width ``H``.
        shapes: The shapes of the generated tensors.
        base: Whether the hypernetwork has a base (``base="learned"`` or ``"frozen"``).
        bases: The bases' values, for :class:`HybridHead` (which tensors need its additive
            term).
    """
    sizes = [torch.Size(s) for s in shapes]
    numel = sum(s.numel() for s in sizes)
    budget = AUTO_BUDGET
    cost = (in_features + 1) * numel
    head: Head
    if cost <= budget:
        head = DenseHead(in_features, shapes)
        head.reason = f"auto: dense needs {cost:,} parameters, within the budget of {budget:,}"
        return head
    over = f"auto: dense would need {cost:,} parameters, over the budget of {budget:,}"
    if base:
        head = HybridHead(in_features, shapes, budget=budget, bases=bases)
        dense = len(head.dense_index)
        head.reason = over + (
            f"; dense maps for the {dense} smallest of {len(sizes)} tensors"
            if dense
            else "; no tensor fits it alone: row scales and additive terms only"
        )
        return head
    per_rank = sum(sum(_matrix_shape(s)) + in_features + 1 for s in sizes)
    rank = int(min(_AUTO_MAX_RANK, max(1, _AUTO_HEAD_SHARE * numel // per_rank)))
    head = LoRAHead(in_features, shapes, rank=rank)
    head.reason = f"{over}; with base='none', a LoRAHead of rank {rank}"
    return head


def summary(hypernetwork: nn.Module) -> str:
    r"""A parameter-count report of a hypernetwork: its head, its base, and its size against
    what it generates.

    Args:
        hypernetwork: A :class:`~torchhyper.HyperNetwork` or
            :class:`~torchhyper.EmbeddingHyperNetwork`.

    Returns:
        A few lines of text: the head (and why ``head="auto"`` chose it), the base, the
        generated values, and the trained parameters by submodule.

    Example:
        >>> from torchhyper import HyperNetwork
        >>> hyper = HyperNetwork(4, [32, 64, 96], nn.Linear(30, 30))
        >>> print(summary(hyper))
        head: DenseHead()
        why: auto: dense needs 90,210 parameters, within the budget of 1,048,576
        base: learned (930 values, trained)
        generated: 930 values in 2 tensors
        trained parameters: 99,654 (107x generated): gain 2, encoder 8,512, head 90,210, base 930
    """
    head = getattr(hypernetwork, "head", None)
    numel = getattr(hypernetwork, "numel", None)
    if not isinstance(head, nn.Module) or not isinstance(numel, int):
        raise TypeError(
            "hypernetwork must be a HyperNetwork (with a head and numel), "
            f"got {type(hypernetwork).__name__}"
        )
    parts: dict[str, int] = {}
    for name, p in hypernetwork.named_parameters():
        if p.requires_grad:
            owner = name.split(".")[0]
            parts[owner] = parts.get(owner, 0) + p.numel()
    total = sum(parts.values())
    options = ", ".join(
        f"{k}={getattr(head, k)}" for k in ("budget", "rank", "chunk_size") if hasattr(head, k)
    )
    tensors = len(getattr(head, "shapes", [])) or "?"
    detail = ", ".join(f"{k} {v:,}" for k, v in parts.items())
    base = getattr(hypernetwork, "_base_choice", "none")
    how = {"learned": "trained", "frozen": "fixed"}.get(base)
    reason = getattr(head, "reason", "")
    return (
        f"head: {type(head).__name__}({options})\n"
        + (f"why: {reason}\n" if reason else "")
        + (f"base: {base} ({numel:,} values, {how})\n" if how else "base: none\n")
        + f"generated: {numel:,} values in {tensors} tensors\n"
        f"trained parameters: {total:,} ({total / numel:.3g}x generated): {detail}"
    )


def _head_options(head: type[Head]) -> list[str] | None:
    """The keyword options of a head class beyond ``(in_features, shapes)``, e.g. ``["rank"]``
    for :class:`LoRAHead`; ``None`` if it takes any (``**kwargs``)."""
    parameters = list(inspect.signature(head).parameters.values())[2:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in keyword]


def _make_head(
    head: Union[str, HeadFactory],
    in_features: int,
    shapes: Sequence[Sequence[int]],
    *,
    bases: Sequence[Tensor] | None,
) -> Head:
    """Builds ``head=`` as a :class:`Head`, wrapping any other module once, and checks it.
    ``bases`` are the bases' values (``None`` with ``base="none"``), passed to a head whose
    factory takes a ``bases`` keyword."""
    base = bases is not None
    if isinstance(head, str):
        if head in _RENAMED and head not in HEADS:
            raise ValueError(f"head={head!r} is now head={_RENAMED[head]!r}")
        if head != "auto" and head not in HEADS:
            raise ValueError(f"head must be one of {head_names()} or a callable, got {head!r}")
        factory: HeadFactory = (
            functools.partial(auto_head, base=base) if head == "auto" else HEADS[head]
        )
    elif callable(head):
        factory = head
    else:
        raise TypeError(
            f"head must be a name or a callable (in_features, shapes) -> Head, got {head!r}"
        )
    bound = isinstance(factory, functools.partial) and "bases" in factory.keywords
    if base and not bound and _takes_bases(factory):
        factory = functools.partial(cast(Any, factory), bases=bases)
    module = factory(in_features, shapes)
    if not isinstance(module, nn.Module):
        raise TypeError(f"head factory must return an nn.Module, got {type(module).__name__}")
    if not isinstance(module, Head):
        numel = sum(torch.Size(s).numel() for s in shapes)
        ref = next(module.parameters(), None)
        dummy = torch.zeros(in_features) if ref is None else ref.new_zeros(in_features)
        what = (
            f"head factory returned {type(module).__name__}, which must map an embedding "
            f"({in_features},) to ({numel},) values (one per generated value)"
        )
        output_shape(module, dummy, (numel,), what)
        module = _ModuleHead(module, in_features, shapes)
    if module.needs_base and not base:
        raise ValueError(
            f"head {type(module).__name__} modulates a base, but base='none': "
            "use base='learned' or 'frozen', or a head that generates tensors (e.g. 'dense')"
        )
    return module


def _takes_bases(factory: HeadFactory) -> bool:
    """Whether ``factory`` takes a ``bases`` keyword (``auto_head``, :class:`HybridHead`)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        return False
    bases = parameters.get("bases")
    return bases is not None and bases.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
