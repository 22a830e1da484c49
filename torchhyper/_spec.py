r"""What a hypernetwork generates: one record, read from the downstream and checked once.

:func:`_what_to_generate` checks the downstream and the options that select its tensors, and
returns a :class:`_Generated`. It changes nothing and draws no random numbers, so a constructor
calls it before it builds anything.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

import torch
from torch import nn

from torchhyper._checks import module
from torchhyper._record import _SHOWN, _few

__all__: list[str] = []

BASES = ("learned", "frozen", "none")
"""The choices of ``base=``: see :class:`~torchhyper.HyperNetwork`."""


@dataclass(frozen=True)
class _Generated:
    """The downstream tensors a hypernetwork generates, in ``named_parameters()`` order, with
    the shape and dtype each had at construction."""

    names: list[str]
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]

    @property
    def numels(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the hypernetwork computes in: the widest of the tensors' and PyTorch's
        default (``float32`` for a ``float16`` or ``bfloat16`` downstream)."""
        return functools.reduce(torch.promote_types, self.dtypes, torch.get_default_dtype())


def _what_to_generate(
    downstream: nn.Module,
    *,
    include: str | list[str] | None,
    exclude: str | list[str] | None,
    base: str,
) -> _Generated:
    """Checks ``downstream``, ``include``, ``exclude`` and ``base``; returns what is generated."""
    module("downstream", downstream)
    if isinstance(downstream, torch.jit.ScriptModule):
        raise TypeError(
            f"downstream is a TorchScript module ({type(downstream).__name__}): "
            "torch.func.functional_call cannot replace its parameters, so nothing generated "
            "could be applied to it; pass the nn.Module itself, before torch.jit.script or "
            "torch.jit.trace"
        )
    if base not in BASES:
        raise ValueError(f"base must be one of {list(BASES)}, got {base!r}")
    uninit = nn.parameter.UninitializedParameter
    lazy = [n for n, p in downstream.named_parameters() if isinstance(p, uninit)]
    if lazy:
        raise ValueError(
            f"the downstream has uninitialized lazy parameters {lazy}: run one forward "
            "pass of the downstream on an example input before building the hypernetwork"
        )
    params = dict(downstream.named_parameters())
    if not params:
        raise ValueError(
            f"the downstream {type(downstream).__name__} has no parameters to generate"
        )
    on_meta = [n for n, p in params.items() if p.is_meta]
    if on_meta:
        raise ValueError(
            f"downstream parameters {_few(on_meta)} are on the meta device (they hold no "
            "values), but the hypernetwork starts from the downstream's values (its base, or "
            "with base='none' their statistics): materialize the downstream first, e.g. "
            "downstream.to_empty(device='cpu'), then initialize it or load its weights"
        )
    names = _select(list(params), include, exclude)
    not_real = [n for n in names if not params[n].is_floating_point()]
    if not_real:
        shown = ", ".join(f"{n} ({params[n].dtype})" for n in not_real[:_SHOWN])
        complex_ = any(params[n].is_complex() for n in not_real)
        raise TypeError(
            f"downstream parameters to generate must be real floating point, got {shown}"
            + (" ..." if len(not_real) > _SHOWN else "")
            + (
                ": a complex tensor would be generated as real, losing its imaginary part. "
                "Hold it as a real parameter of shape (*, 2) (torch.view_as_real) and rebuild "
                "it in forward (torch.view_as_complex), or"
                if complex_
                else ":"
            )
            + f" leave them to the module with exclude={not_real[:_SHOWN]!r}"
        )
    return _Generated(names, [params[n].shape for n in names], [params[n].dtype for n in names])


def _select(
    names: list[str], include: str | list[str] | None, exclude: str | list[str] | None
) -> list[str]:
    """Names kept by glob patterns; a pattern that matches nothing is an error."""

    def patterns(value: str | list[str] | None, argument: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{argument} must be a glob string or a list of them, got {value!r}")
        return list(value)

    inc, exc = patterns(include, "include"), patterns(exclude, "exclude")
    unmatched = [p for p in inc + exc if not fnmatch.filter(names, p)]
    if unmatched:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(
            f"pattern(s) {unmatched} match no parameter of the downstream; "
            f"available names ({len(names)}): {shown}"
        )
    kept = [n for n in names if not inc or any(fnmatch.fnmatchcase(n, p) for p in inc)]
    kept = [n for n in kept if not any(fnmatch.fnmatchcase(n, p) for p in exc)]
    if not kept:
        raise ValueError(f"include={inc} and exclude={exc} leave no parameter to generate")
    return kept
