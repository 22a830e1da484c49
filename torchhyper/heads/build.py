r"""Building ``head=``: the ``"auto"`` policy (:func:`auto_head`), names and factories
(:func:`_make_head`), and the report of a hypernetwork's parts (:func:`summary`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Union

import torch
from torch import nn

from torchhyper._checks import output_shape
from torchhyper.heads.dense import DenseHead
from torchhyper.heads.film import FiLMHead
from torchhyper.heads.head import HEADS, Head, HeadFactory, _as_matrix, _ModuleHead, head_names
from torchhyper.heads.lowrank import LoRAHead

__all__ = ["auto_head", "summary"]


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
        >>> from torchhyper import HyperNetwork
        >>> hyper = HyperNetwork(4, [32, 64, 96], nn.Linear(300, 300))
        >>> print(summary(hyper).splitlines()[:2])
        ['head: FiLMHead()', 'base: learned (90,300 values, trained)']
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
        f"{k}={getattr(head, k)}" for k in ("rank", "chunk_size") if hasattr(head, k)
    )
    tensors = len(getattr(head, "shapes", [])) or "?"
    detail = ", ".join(f"{k} {v:,}" for k, v in parts.items())
    base = getattr(hypernetwork, "base", "none")
    how = {"learned": "trained", "frozen": "fixed"}.get(base)
    return (
        f"head: {type(head).__name__}({options})\n"
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
    head: Union[str, HeadFactory], in_features: int, shapes: Sequence[Sequence[int]], *, base: bool
) -> Head:
    """Builds ``head=`` as a :class:`Head`, wrapping any other module once, and checks it."""
    if isinstance(head, str):
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
