r"""Helpers that put generated parameters into a downstream module, by name.

:func:`torch.func.functional_call` covers ``forward``. These cover the rest:

* :func:`bind` runs *any* method (``sample()``, ``log_prob()``) with given parameters, with
  gradients flowing back to whatever produced them;
* :func:`load_params` writes parameters into the module in place, checked by name;
* :func:`materialize` returns a standalone copy of the module that carries them, for export.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from torchhyper._names import _Slot, _walk

__all__ = ["bind", "load_params", "materialize"]


def _slots(module: nn.Module) -> dict[str, list[_Slot]]:
    """Maps each parameter or buffer name (as ``named_parameters()`` spells it) to every place that
    holds that tensor. Tied tensors have several places under one name."""
    slots: dict[str, list[_Slot]] = {}
    for slot in _walk(module):
        slots.setdefault(slot.first, []).append(slot)
    return slots


def _check(
    module: nn.Module,
    params: Mapping[str, Tensor],
    *,
    argument: str,
    names: list[str],
    require_all: bool,
    check_dtype: bool,
) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"{argument} must be a dict of name -> Tensor, got {type(params).__name__}")
    unexpected = [k for k in params if k not in names]
    missing = [k for k in names if k not in params] if require_all else []
    if unexpected or missing:
        raise ValueError(
            f"{argument} does not match the names of {type(module).__name__}: "
            f"unexpected keys {unexpected}, missing keys {missing}; "
            f"expected names like {names[:8]}{' ...' if len(names) > 8 else ''}"
        )
    reference: dict[str, Tensor] = dict(module.named_parameters())
    reference.update(module.named_buffers())
    not_tensors = [k for k, v in params.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise TypeError(f"{argument} values must be tensors; not tensors: {not_tensors}")
    shapes = [
        f"{k}: expected {tuple(reference[k].shape)}, got {tuple(v.shape)}"
        for k, v in params.items()
        if v.shape != reference[k].shape
    ]
    if shapes:
        raise ValueError(f"{argument} has wrong shapes: " + "; ".join(shapes))
    if check_dtype:
        dtypes = [
            f"{k}: expected {reference[k].dtype}, got {v.dtype}"
            for k, v in params.items()
            if v.dtype != reference[k].dtype
        ]
        if dtypes:
            raise TypeError(f"{argument} has wrong dtypes: " + "; ".join(dtypes))


@contextmanager
def bind(module: nn.Module, params: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    r"""Binds ``params`` to ``module`` for the body of a ``with`` block.

    Any method of the module then runs with these tensors in place of its own, and gradients
    flow back into them (and so into a hypernetwork that generated them). Tied parameters are
    bound under their one name. The original tensors are restored on exit, also when the body
    raises.

    Args:
        module: The downstream module.
        params: Tensors keyed by parameter (or buffer) names, shapes as in the module; a subset.

    Yields:
        The module itself.

    Raises:
        ValueError: Unknown names, or wrong shapes.

    Example:
        >>> from torchhyper import HyperNetwork
        >>> class Gaussian(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.loc = nn.Parameter(torch.zeros(2))
        ...     def sample(self, n):
        ...         return self.loc + torch.randn(n, 2)
        >>> flow = Gaussian()
        >>> hypernetwork = HyperNetwork(2, [16], flow)
        >>> with bind(flow, hypernetwork(torch.randn(32, 2))):
        ...     samples = flow.sample(64)       # sampled with the generated loc
        >>> samples.requires_grad, isinstance(flow.loc, nn.Parameter)  # restored on exit
        (True, True)
    """
    slots = _slots(module)
    _check(
        module, params, argument="params", names=list(slots), require_all=False, check_dtype=False
    )
    saved: list[tuple[dict[str, Any], str, Tensor]] = []
    try:
        for name, value in params.items():
            for slot in slots[name]:
                table = slot.table
                saved.append((table, slot.attr, table[slot.attr]))
                table[slot.attr] = value
        yield module
    finally:
        for table, attr, original in reversed(saved):
            table[attr] = original


def load_params(module: nn.Module, params: Mapping[str, Tensor], *, strict: bool = True) -> None:
    r"""Copies ``params`` into ``module``'s parameters in place, matched by name.

    All names are checked before anything is written: every unexpected name, and with
    ``strict`` every missing one, is reported at once, and so are wrong shapes and dtypes.

    Args:
        module: The module to write into.
        params: Tensors keyed like ``module.named_parameters()``.
        strict: Require every parameter of the module to be present.

    Raises:
        ValueError: Unknown or missing names, or wrong shapes.
        TypeError: Wrong dtypes, or values that are not tensors.
    """
    names = [n for n, _ in module.named_parameters()]
    _check(module, params, argument="params", names=names, require_all=strict, check_dtype=True)
    targets = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            targets[name].copy_(value)


def materialize(module: nn.Module, params: Mapping[str, Tensor]) -> nn.Module:
    r"""Returns a deep copy of ``module`` that carries ``params`` (detached), for export.

    ``module`` itself is left untouched; names missing from ``params`` keep its values.

    Raises:
        ValueError: Unknown names, or wrong shapes.
        TypeError: Wrong dtypes.
    """
    names = [n for n, _ in module.named_parameters()]
    _check(module, params, argument="params", names=names, require_all=False, check_dtype=True)
    clone = copy.deepcopy(module)
    load_params(clone, {k: v.detach() for k, v in params.items()}, strict=False)
    return clone
