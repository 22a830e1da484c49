r"""Helpers that put generated parameters into a downstream module, by name.

:func:`torch.func.functional_call` covers ``forward``. These cover the rest:

* :func:`bind` runs *any* method (``sample()``, ``log_prob()``) with given parameters, with
  gradients flowing back to whatever produced them;
* :func:`load_params` writes parameters into the module in place, checked by name;
* :func:`materialize` returns a standalone copy of the module that carries them, for export.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    check_copy: bool = False,
) -> None:
    """Checks ``params`` against ``module``: every name, then every shape, dtype and (with
    ``check_copy``, for an in-place copy) layout and device, reporting all offenders at once."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{argument} must be a dict of name -> Tensor, got {type(params).__name__}")
    unexpected = [k for k in params if k not in names]
    missing = [k for k in names if k not in params] if require_all else []
    if unexpected or missing:
        subset = (
            f". {argument} covers only a subset of the module's parameters (as a hypernetwork "
            "built with include=... or exclude=... generates): pass strict=False to keep the "
            "module's own values for the missing ones"
            if missing and not unexpected
            else ""
        )
        raise ValueError(
            f"{argument} does not match the names of {type(module).__name__}: "
            f"unexpected keys {unexpected}, missing keys {missing}; "
            f"expected names like {names[:8]}{' ...' if len(names) > 8 else ''}{subset}"
        )
    reference: dict[str, Tensor] = dict(module.named_parameters())
    reference.update(module.named_buffers())
    _refuse(
        TypeError,
        f"{argument} values must be tensors: ",
        [
            f"{argument}[{k!r}] is {type(v).__name__}"
            for k, v in params.items()
            if not isinstance(v, Tensor)
        ],
        ". Convert them, e.g. with torch.as_tensor(value), shaped like the module's own parameter",
    )
    shapes = [
        f"{k}: expected {tuple(reference[k].shape)}, got {tuple(v.shape)}"
        for k, v in params.items()
        if v.shape != reference[k].shape
    ]
    # One parameter set per sample, (B, *shape), where the module holds one set of `shape`.
    batched = [
        f"{k} (B={v.shape[0]})"
        for k, v in params.items()
        if v.dim() == reference[k].dim() + 1 and v.shape[1:] == reference[k].shape
    ]
    if batched:
        raise ValueError(
            f"{argument} has wrong shapes: {'; '.join(shapes)}. These tensors have an extra "
            f"leading dimension, (B, *shape) where the module expects shape: {', '.join(batched)}"
            ". They hold one parameter set per sample (as HyperNetwork.per_sample, "
            "HyperNetwork.per_set and EmbeddingHyperNetwork(ids) return): apply them with "
            "torchhyper.per_sample_call(module, params, x), or index one set: "
            "{k: v[i] for k, v in params.items()}"
        )
    _refuse(ValueError, f"{argument} has wrong shapes: ", shapes)
    if check_dtype:
        _refuse(
            TypeError,
            f"{argument} has wrong dtypes: ",
            [
                f"{k}: expected {reference[k].dtype}, got {v.dtype}"
                for k, v in params.items()
                if v.dtype != reference[k].dtype
            ],
        )
    if check_copy:
        # What copy_ cannot do: read a value with no data, or a sparse one, or write into a
        # parameter with no data (on meta, a copy does nothing at all).
        bad = []
        for k, v in params.items():
            if reference[k].is_meta:
                bad.append(
                    f"{k}: the module's parameter is on the meta device (nothing to copy "
                    "into); materialize the module first, e.g. module.to_empty(device='cpu')"
                )
            elif v.is_meta:
                bad.append(f"{k}: the value is on the meta device (no data to copy)")
            if v.layout != torch.strided:
                bad.append(f"{k}: the value has layout {v.layout}, expected torch.strided")
        _refuse(ValueError, f"{argument} cannot be copied into {type(module).__name__}: ", bad)


def _refuse(error: type[Exception], lead: str, offenders: list[str], tail: str = "") -> None:
    """Raises ``error`` with every offender, between ``lead`` and ``tail``; nothing if none."""
    if offenders:
        raise error(lead + "; ".join(offenders) + tail)


@dataclass
class _Entry:
    """One bind's hold on a slot."""

    token: object  # the bind
    value: Tensor  # what it put there
    thread: int
    disturbed: bool = False  # another thread bound the slot while this bind was active


@dataclass
class _Bound:
    """The binds active on one slot (a key of a module's ``_parameters`` or ``_buffers``)."""

    table: dict[str, Any]
    original: Any  # what the slot held before the first of them
    stack: list[_Entry] = field(default_factory=list)  # in the order they entered


# Every slot that an active bind holds, by (id(table), attr); guarded by _LOCK. Each entry holds
# its table, so the id stays that of a live dict while the entry exists.
_ACTIVE: dict[tuple[int, str], _Bound] = {}
_LOCK = threading.Lock()


def _enter(token: object, table: dict[str, Any], attr: str, value: Tensor) -> None:
    thread = threading.get_ident()
    with _LOCK:
        bound = _ACTIVE.setdefault((id(table), attr), _Bound(table, table[attr]))
        for entry in bound.stack:
            entry.disturbed |= entry.thread != thread
        bound.stack.append(_Entry(token, value, thread))
        table[attr] = value


def _exit(token: object, table: dict[str, Any], attr: str) -> str | None:
    """Undoes bind ``token``'s last hold on one slot; returns what went wrong, or None.

    In order (the last bind to enter exits first) the slot gets back what it held before. Out
    of order (another bind entered since, and is still active), the slot is left to that bind,
    which on its exit restores what this one would have: the module ends with its own tensors.
    """
    with _LOCK:
        key = (id(table), attr)
        bound = _ACTIVE[key]
        place = max(i for i, e in enumerate(bound.stack) if e.token is token)
        entry = bound.stack.pop(place)
        last = place == len(bound.stack)
        below = bound.stack[-1].value if bound.stack else bound.original
        if not bound.stack:
            del _ACTIVE[key]
        if not last:
            return (
                "another bind entered after this one and is still active (binds must exit in "
                "the reverse order of entering)"
            )
        if table.get(attr) is not entry.value:
            # Assigned inside the body (module.weight = ...): the assignment is left in place.
            return "it was assigned inside the body, and is left as assigned"
        table[attr] = below
        if entry.disturbed:
            return "another thread bound it while this bind was active"
        return None


@contextmanager
def bind(module: nn.Module, params: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    r"""Binds ``params`` to ``module`` for the body of a ``with`` block.

    Any method of the module then runs with these tensors in place of its own, and gradients
    flow back into them (and so into a hypernetwork that generated them). Tied parameters are
    bound under their one name. The original tensors are restored on exit, also when the body
    raises. Binds nest: an inner one restores the outer one's tensors.

    Not thread-safe: the module is one object, so two threads that bind it at once each run
    with whichever tensors were bound last. Use :func:`torch.func.functional_call` (thread-safe
    for ``forward``), or one copy of the module per thread. Interleaving is detected on exit: a
    bind that another thread's bind of the same slot overlapped, that exits out of order, or
    whose slot was assigned inside the body raises a ``RuntimeError`` naming the slots (its body
    may have run with other tensors), and the module is never left holding a bound tensor: it
    gets its own tensors back when the last bind exits.

    Args:
        module: The downstream module.
        params: Tensors keyed by parameter (or buffer) names, shapes as in the module; a subset.

    Yields:
        The module itself.

    Raises:
        ValueError: Unknown names, or wrong shapes.
        RuntimeError: On exit: a bind of the same slots from another thread overlapped this
            one, or a bound slot was assigned inside the body.

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
    token = object()  # this bind, in the slots' stacks
    entered: list[tuple[dict[str, Any], str, str]] = []
    try:
        for name, value in params.items():
            for slot in slots[name]:
                _enter(token, slot.table, slot.attr, value)
                entered.append((slot.table, slot.attr, slot.name))
        yield module
    finally:
        problems = []
        for table, attr, name in reversed(entered):
            problem = _exit(token, table, attr)
            if problem:
                problems.append(f"{name}: {problem}")
        if problems:
            raise RuntimeError(
                f"bind({type(module).__name__}) was not the only one to change the module while "
                f"it was active (bind is not thread-safe): {'; '.join(problems)}. The body may "
                "have run with other tensors than those bound; the module gets its own back when "
                "the last bind exits. Use torch.func.functional_call, or one module per thread."
            )


def load_params(module: nn.Module, params: Mapping[str, Tensor], *, strict: bool = True) -> None:
    r"""Copies ``params`` into ``module``'s parameters in place, matched by name.

    Atomic: every name, shape, dtype, layout and device is checked before the first write,
    so that a failure leaves the module as it was. Every unexpected name, and with ``strict``
    every missing one, is reported at once, and so are wrong shapes, dtypes and values that
    cannot be copied (on the meta device, sparse, or into a parameter on the meta device).

    Args:
        module: The module to write into.
        params: Tensors keyed like ``module.named_parameters()``.
        strict: Require every parameter of the module to be present.

    Values may alias the module's own parameters (``{"a": m.b, "b": m.a}`` swaps them): every
    value is read before the first write.

    Raises:
        ValueError: Unknown or missing names (a subset of the names needs ``strict=False``),
            wrong shapes (batched ``(B, *shape)`` values included), or values that cannot be
            copied.
        TypeError: Wrong dtypes, or values that are not tensors.
    """
    names = [n for n, _ in module.named_parameters()]
    _check(
        module,
        params,
        argument="params",
        names=names,
        require_all=strict,
        check_dtype=True,
        check_copy=True,
    )
    targets = dict(module.named_parameters())
    # A value may alias a parameter that is written first (a swap: {"a": m.b, "b": m.a}): read
    # every such value (a copy) before the first write. A value that is its own target is not.
    written = {_storage(targets[k]) for k in params}
    sources = {
        k: v.clone() if v is not targets[k] and _storage(v) in written else v
        for k, v in params.items()
    }
    with torch.no_grad():
        for name, value in sources.items():
            targets[name].copy_(value)


def _storage(tensor: Tensor) -> tuple[torch.device, int]:
    """Where ``tensor``'s memory lives: equal for tensors that share storage (views)."""
    return tensor.device, tensor.untyped_storage().data_ptr()


def materialize(module: nn.Module, params: Mapping[str, Tensor]) -> nn.Module:
    r"""Returns a deep copy of ``module`` that carries ``params`` (detached), for export.

    ``module`` itself is left untouched; names missing from ``params`` keep its values.

    Raises:
        ValueError: Unknown names, or wrong shapes (batched ``(B, *shape)`` values included).
        TypeError: Wrong dtypes, values that are not tensors, or a module that cannot be
            deep-copied.
    """
    names = [n for n, _ in module.named_parameters()]
    _check(module, params, argument="params", names=names, require_all=False, check_dtype=True)
    clone = _deepcopy(module)
    load_params(clone, {k: v.detach() for k, v in params.items()}, strict=False)
    return clone


def _deepcopy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, also for deeply nested modules, with an error that says which
    attribute cannot be copied."""
    # deepcopy recurses about six frames per level of submodules: 200 nested Sequentials
    # overflow Python's default limit of 1000 frames.
    depth = max(name.count(".") + 1 for name, _ in module.named_modules())
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 10 * depth)
    try:
        return copy.deepcopy(module)
    except (TypeError, copy.Error) as error:
        found = _uncopyable(module)
        where = f" (attributes that cannot be copied: {'; '.join(found)})" if found else ""
        raise TypeError(
            f"materialize needs a deep copy of the module, and {type(module).__name__} cannot "
            f"be deep-copied: {error}{where}. Make it deep-copyable (e.g. give the class a "
            "__deepcopy__, or create such attributes lazily), or use bind(module, params) or "
            "load_params(module, params) on the module itself"
        ) from error
    finally:
        sys.setrecursionlimit(limit)


def _uncopyable(module: nn.Module) -> list[str]:
    """The attributes of ``module`` and its submodules that ``copy.deepcopy`` fails on, as
    ``name (type)``. Each submodule is searched on its own; parameters and buffers are skipped."""
    found = []
    for path, owner in module.named_modules():
        for attr, value in vars(owner).items():
            if attr in ("_modules", "_parameters", "_buffers") or isinstance(value, nn.Module):
                continue
            try:
                copy.deepcopy(value)
            except Exception:
                found.append(f"{path + '.' if path else ''}{attr} ({type(value).__name__})")
    return found
