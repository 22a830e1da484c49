r"""Where a module's parameters and buffers live: one walk from their names to their owners.

:func:`_walk` is the one place that turns a name as ``named_parameters()`` spells it
(``"0.weight"``) into the module and attribute that hold the tensor. Tied tensors appear once per
place that holds them, each with the tensor's first name, its key in a ``params`` dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from torch import Tensor, nn

__all__: list[str] = []


class _Slot(NamedTuple):
    """One place that holds a parameter or buffer of a module."""

    name: str  # as ``named_parameters(remove_duplicate=False)`` spells this place
    first: str  # the tensor's first such name: ``name`` unless the tensor is tied
    owner: nn.Module  # the (sub)module that holds it
    kind: Literal["_parameters", "_buffers"]
    attr: str  # its key in ``owner._parameters`` or ``owner._buffers``
    tensor: Tensor

    @property
    def table(self) -> dict[str, Any]:
        """``owner._parameters`` or ``owner._buffers``: the dict to read or swap ``attr`` in."""
        table: dict[str, Any] = getattr(self.owner, self.kind)
        return table


def _walk(module: nn.Module) -> Iterator[_Slot]:
    """Every place that holds a parameter, then every place that holds a buffer, in the order of
    ``named_parameters(remove_duplicate=False)`` and ``named_buffers(remove_duplicate=False)``.

    The slots with ``name == first`` are exactly those of ``named_parameters()`` and
    ``named_buffers()`` (duplicates removed): the first name of a tied tensor wins.
    """
    # Owners come from the module walk itself, as named_parameters() walks them: no lookup per
    # name, so the walk stays linear in the number of tensors.
    modules = list(module.named_modules(remove_duplicate=False))
    yield from _places(modules, "_parameters")
    yield from _places(modules, "_buffers")


def _places(
    modules: list[tuple[str, nn.Module]], kind: Literal["_parameters", "_buffers"]
) -> Iterator[_Slot]:
    first: dict[int, str] = {}  # id(tensor) -> its first name, per kind as in torch
    for path, owner in modules:
        table: dict[str, Tensor | None] = getattr(owner, kind)
        for attr, tensor in table.items():
            if tensor is None:
                continue
            name = f"{path}.{attr}" if path else attr
            key = first.setdefault(id(tensor), name)
            yield _Slot(name, key, owner, kind, attr, tensor)
