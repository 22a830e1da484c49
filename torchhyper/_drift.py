r"""What a hypernetwork was built on, checked at each call: the downstream changing under it.

A hypernetwork generates tensors for the names, shapes and dtypes its downstream had at
construction. A layer appended, replaced or converted afterwards would run with its own weights,
the wrong shapes or the wrong dtype, and fail deep inside torch or, worse, not at all.
:class:`_Watch` keeps a weak reference to the downstream and compares it at every call.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from torchhyper._record import _capped, _few

if TYPE_CHECKING:
    from torchhyper._spec import _Generated

__all__: list[str] = []


class _Watch:
    """The downstream (weakly) and what it held at construction: every parameter name, and the
    generated tensors' shapes and dtypes."""

    def __init__(self, downstream: nn.Module, generated: _Generated) -> None:
        self.ref: weakref.ref[nn.Module] | None = weakref.ref(downstream)
        self.names = [n for n, _ in downstream.named_parameters()]
        self.generated = {
            n: (s, d) for n, s, d in zip(generated.names, generated.shapes, generated.dtypes)
        }

    def module(self) -> nn.Module | None:
        return None if self.ref is None else self.ref()

    def problems(self) -> list[str]:
        """How the downstream differs from what it was at construction: empty if it does not,
        or if it is gone."""
        module = self.module()
        if module is None:
            return []
        params = dict(module.named_parameters())
        lines = []
        if list(params) != self.names:
            known = set(self.names)
            added = [n for n in params if n not in known]
            removed = [n for n in self.names if n not in params]
            if added:
                lines.append(f"parameters added since: {_few(added)} (they are not generated)")
            if removed:
                lines.append(f"parameters removed since: {_few(removed)}")
            if not added and not removed:
                lines.append("its parameters are listed in another order")
        changed = []
        for name, (shape, dtype) in self.generated.items():
            p = params.get(name)
            if p is None:
                continue
            if p.shape != shape:
                changed.append(f"{name}: shape {tuple(shape)} -> {tuple(p.shape)}")
            elif p.dtype != dtype:
                changed.append(f"{name}: dtype {dtype} -> {p.dtype}")
        if changed:
            lines.append(", ".join(_capped(changed, "changed")))
        return lines

    def elsewhere(self, device: torch.device) -> list[str]:
        """The downstream's tensors that the hypernetwork does not generate (buffers, parameters
        left out by ``include``/``exclude``) and that live on another device than ``device``."""
        module = self.module()
        if module is None:
            return []
        kept: list[tuple[str, Tensor]] = [
            (n, p) for n, p in module.named_parameters() if n not in self.generated
        ]
        kept += list(module.named_buffers())
        return [f"{n} ({t.device})" for n, t in kept if t.device != device]

    def __getstate__(self) -> dict[str, Any]:
        # A weak reference cannot be pickled (torch.save of the whole hypernetwork): the copy
        # forgets its downstream and checks nothing.
        return {**self.__dict__, "ref": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> _Watch:
        # A deep copy of the hypernetwork watches the same downstream (it is not copied).
        new = object.__new__(_Watch)
        new.__dict__.update(self.__dict__, names=list(self.names), generated=dict(self.generated))
        return new


def _check(watch: _Watch, device: torch.device) -> None:
    """Raises if the downstream changed since construction, or keeps tensors on a device other
    than the generated tensors' ``device``."""
    lines = watch.problems()
    if lines:
        raise ValueError(
            "the downstream changed after the hypernetwork was built: "
            + "; ".join(lines)
            + ". The hypernetwork generates the names, shapes and dtypes the downstream had "
            "at construction: change the downstream first (add or replace layers, convert it "
            "with .double() or .half()), then build the hypernetwork"
        )
    away = watch.elsewhere(device)
    if away:
        raise ValueError(
            f"the downstream keeps tensors that are not generated on another device than the "
            f"hypernetwork ({device}): {_few(away)}; move the downstream, e.g. "
            f"downstream.to('{device}'), or the hypernetwork"
        )
