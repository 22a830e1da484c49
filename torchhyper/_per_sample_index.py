r"""Where a downstream's tensors live, the plan of its layers, and the checks of batched
parameter sets: the bookkeeping of :func:`~torchhyper.per_sample_call`, cached per module."""

from __future__ import annotations

import operator
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from torchhyper._fast_layers import _FAST, _ROWWISE, _Handler, _linear
from torchhyper._names import _walk

__all__: list[str] = []


class _Plan(NamedTuple):
    """The leaves of a tree of ``nn.Sequential``, in order, with their fast handlers."""

    steps: list[tuple[nn.Module, _Handler | None]]
    rows: bool  # whether to run per-sample vectors as rows: see _run

    @classmethod
    def of(cls, steps: list[tuple[nn.Module, _Handler | None]]) -> _Plan:
        # Rows need every step to be row-wise, and pay off when a Linear saves its reshapes.
        rowwise = all(fast in _ROWWISE for _, fast in steps)
        return cls(steps, rowwise and any(fast is _linear for _, fast in steps))


class _Index:
    """Where a module's parameters and buffers live, by name, and the plan of its layers:
    cached per module, and checked at each call."""

    def __init__(self, module: nn.Module) -> None:
        tables: list[dict[str, Any]] = []
        attrs: list[str] = []
        self.tensors: dict[str, Tensor] = {}
        self.names: dict[int, str] = {}  # id(tensor) -> its (first) name
        for slot in _walk(module):
            if slot.name == slot.first:  # as named_parameters() and named_buffers() list them
                tables.append(slot.table)
                attrs.append(slot.attr)
                self.tensors[slot.name] = slot.tensor
                self.names[id(slot.tensor)] = slot.name
        self._places = (tables, attrs, list(self.tensors.values()))
        self._sizes = [t.size() for t in self.tensors.values()]
        # (names, sizes) of params that passed the full check -> their B; reset with the index.
        self.checked: dict[tuple[tuple[str, ...], tuple[torch.Size, ...]], int] = {}
        self._plan: _Plan | None = None
        # Each container of the plan, with its children when planned. Weak: the index is the
        # value of a weak dict keyed by the module, and must not keep it alive.
        self._containers: list[tuple[weakref.ref[nn.Module], list[nn.Module]]] = []

    def valid(self) -> bool:
        """Whether every tensor is still in its place, with its size (``.data`` may change it)."""
        tables, attrs, tensors = self._places
        # At every call: map runs the loop in C, a generator in Python.
        return all(map(operator.is_, map(dict.get, tables, attrs), tensors)) and (
            list(map(Tensor.size, tensors)) == self._sizes
        )

    def plan(self, module: nn.Module) -> _Plan | None:
        """The leaves of ``module``, a tree of ``nn.Sequential`` or a single layer, with their
        fast handlers; None when a container has hooks."""
        if type(module) is not nn.Sequential:  # built at each call: see _containers
            fast = _FAST.get(type(module))
            return _Plan([(module, fast)], fast is _linear)  # as _Plan.of decides, in short
        for ref, kids in self._containers:
            container = ref()
            if container is None or list(container._modules.values()) != kids:
                self._plan = None
                break
        if self._plan is None:
            self._containers = []
            self._plan = _Plan.of(self._flatten(module))
        for ref, _ in self._containers:
            container = ref()
            if container is None or _has_hooks(container):
                return None
        return self._plan

    def _flatten(self, module: nn.Module) -> list[tuple[nn.Module, _Handler | None]]:
        if type(module) is not nn.Sequential:
            return [(module, _FAST.get(type(module)))]
        self._containers.append((weakref.ref(module), list(module._modules.values())))
        return [leaf for child in module for leaf in self._flatten(child)]


_INDEX: weakref.WeakKeyDictionary[nn.Module, _Index] = weakref.WeakKeyDictionary()


def _index(module: nn.Module, *, fresh: bool = False) -> _Index:
    index = _INDEX.get(module)
    if fresh or index is None or not index.valid():
        index = _INDEX[module] = _Index(module)
    return index


def _check(
    downstream: nn.Module,
    params: Mapping[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[int, _Index]:
    """The common B of ``params`` and the inputs, and the index of ``downstream``.

    The hot path of every call: a signature of ``params`` (names and sizes) seen before on an
    unchanged module skips the check of each tensor against its namesake.
    """
    if not isinstance(downstream, nn.Module):
        raise TypeError(f"downstream must be a torch.nn.Module, got {type(downstream).__name__}")
    if type(params) is not dict and not isinstance(params, Mapping):  # an ABC: a slow check
        raise TypeError(f"params must be a dict of name -> Tensor, got {type(params).__name__}")
    index = _index(downstream)
    try:  # Tensor.size raises TypeError on anything else: the full check names it
        key = (tuple(params), tuple(map(Tensor.size, params.values())))
    except TypeError:
        return _explain(downstream, params, args, kwargs)
    batch = index.checked.get(key)
    if batch is None:
        batch = _batch_of(params, index.tensors)
        if batch is None:
            return _explain(downstream, params, args, kwargs)
        if len(index.checked) >= 64:  # many signatures (B varies): start over
            index.checked.clear()
        index.checked[key] = batch
    if kwargs or not all(isinstance(a, Tensor) and a.shape[:1] == (batch,) for a in args):
        _check_inputs(batch, args, kwargs)  # nested inputs, or an error to explain
    return batch, index


def _batch_of(params: Mapping[str, Tensor], tensors: dict[str, Tensor]) -> int | None:
    """The B of ``params`` if each is ``(B, *shape)`` with the shape of its namesake in
    ``tensors``, one B >= 1 for all; else None."""
    batch = -1
    for k, v in params.items():
        ref = tensors.get(k)
        if ref is None or v.dim() != ref.dim() + 1 or v.shape[1:] != ref.shape:
            return None
        if batch != v.shape[0]:
            if batch != -1:
                return None
            batch = v.shape[0]
    return batch if batch > 0 else None


def _explain(
    downstream: nn.Module,
    params: Mapping[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[int, _Index]:
    """The full check, with messages that list every offender; the slow path of :func:`_check`."""
    odd = [f"{k} ({type(v).__name__})" for k, v in params.items() if not isinstance(v, Tensor)]
    if odd:
        raise TypeError(f"params must map names to tensors (B, *shape), got {odd}")
    if not params:
        raise ValueError("params is empty: per_sample_call needs at least one (B, *shape) tensor")
    index = _index(downstream, fresh=True)  # the module may have changed since it was indexed
    reference = index.tensors
    unexpected = [k for k in params if k not in reference]
    if unexpected:
        names = list(reference)
        raise ValueError(
            f"params has names that are not parameters or buffers of {type(downstream).__name__}: "
            f"{unexpected}; expected names like {names[:8]}{' ...' if len(names) > 8 else ''}"
        )
    unbatched = [k for k, v in params.items() if v.shape == reference[k].shape]
    if unbatched and len(unbatched) == len(params):
        raise ValueError(
            f"params are one parameter set, shaped like the module's own ({unbatched[0]}: "
            f"{tuple(params[unbatched[0]].shape)}), but per_sample_call applies one set per "
            "sample, (B, *shape): apply one set with torch.func.functional_call(downstream, "
            "params, x), or generate one per sample with hypernetwork.per_sample(x) (or "
            "per_set)"
        )
    # B is the leading size of most tensors, so that the odd one out is the one reported.
    sizes = [v.shape[0] for k, v in params.items() if v.dim() == reference[k].dim() + 1]
    batch = max(sizes, key=sizes.count) if sizes else 0
    wrong = [
        f"{k}: expected ({batch}, {', '.join(map(str, reference[k].shape))}), got {tuple(v.shape)}"
        for k, v in params.items()
        if v.dim() != reference[k].dim() + 1
        or v.shape[0] != batch
        or v.shape[1:] != reference[k].shape
    ]
    if wrong or batch == 0:
        raise ValueError(
            "params must have shape (B, *shape) with one B >= 1 for all: "
            + "; ".join(wrong or ["B == 0"])
        )
    _check_inputs(batch, args, kwargs)
    return batch, index


def _check_inputs(batch: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raises unless every tensor in ``args`` and ``kwargs``, at any depth, is ``(B, *)``."""
    leaves = tree_flatten((args, kwargs))[0]
    bad = [
        tuple(t.shape)
        for t in leaves
        if isinstance(t, Tensor) and (t.dim() == 0 or t.shape[0] != batch)
    ]
    if bad:
        raise ValueError(
            f"every tensor input must have the leading dimension B == {batch} of params, "
            f"got shapes {bad}; expand a shared input with t.expand({batch}, *t.shape)"
        )


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )
