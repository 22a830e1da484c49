r"""Per-sample parameters: apply ``B`` parameter sets to a downstream in one call.

:meth:`HyperNetwork.per_sample <torchhyper.HyperNetwork.per_sample>` returns one parameter set
per example, each tensor of shape ``(B, *shape)``. :func:`per_sample_call` applies them:

``per_sample_call(downstream, params, x)[i] == functional_call(downstream, params[i], x[i])``

for any module, without a Python loop. Layers with a batched form run as batched kernels:
``Linear`` as a batched matrix product, ``Conv1d/2d/3d`` as a grouped convolution, LayerNorm,
GroupNorm and BatchNorm as usual normalization with per-sample scales and shifts, ``Embedding``
as a gather, ``RNN``/``GRU``/``LSTM`` as a batched recurrence (``vmap`` has no rule for them),
and element-wise activations as they are. ``nn.Sequential`` containers are walked; any other
module (a custom ``forward``, attention, a transposed convolution, a module with hooks) runs
under ``torch.func.vmap(functional_call)``.

BatchNorm in train mode. Each sample normalizes its own slice ``x[i]`` with that slice's batch
statistics, exactly as the loop does, so outputs and gradients equal the loop's. The running
statistics are updated once per call (``num_batches_tracked`` += 1) with the average over samples
of each sample's batch statistics; a loop would instead update them ``B`` times in sequence.

diffusers, transformers and attention. diffusers' UNet blocks normalize transposed views with
``GroupNorm``, which ``vmap`` cannot run; PyTorch's fused attention fast path and the fused
(flash) kernels of ``scaled_dot_product_attention`` have no derivative under ``vmap``.
:func:`vmap_compatible` fixes these for the body of a ``with`` block, without touching the user's
modules; :func:`per_sample_call` enters it around its ``vmap`` fallback, so UNets, transformers
models and attention work there as they are. What cannot be batched is reported as a
``ValueError`` that names the cause and the fix: a forward whose control flow reads a batched
input (transformers' code that builds an attention mask: pass a mask that all samples share in
``shared``, or a 4-D mask) and outputs that are not tensors (a cache: ``use_cache`` is ``False``
unless given).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules import module as _module
from torch.utils._pytree import tree_flatten, tree_map

from torchhyper._fast_layers import _FAST, _ROWWISE, _Context, _Handler, _linear
from torchhyper._kwargs import _explain_vmap_error, _takes_use_cache
from torchhyper._names import _walk
from torchhyper._vmap import _contiguous_input, vmap_compatible

__all__ = ["per_sample_call", "vmap_compatible"]


def per_sample_call(
    downstream: nn.Module,
    params: Mapping[str, Tensor],
    args: Tensor | tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    shared: Mapping[str, Any] | None = None,
) -> Any:
    r"""Runs ``downstream`` once per parameter set, as one batched call.

    Like :func:`torch.func.functional_call`, with a leading batch dimension ``B`` on every
    parameter and every tensor input: the result ``y`` satisfies

    ``y[i] == functional_call(downstream, {k: v[i] for k, v in params.items()}, x[i])``.

    Each ``x[i]`` is what the downstream sees: ``(B, D)`` inputs give each parameter set one
    unbatched example ``(D,)``; ``(B, N, D)`` gives each a batch of ``N`` (needed by modules
    that require a batch dimension, such as BatchNorm or a diffusers UNet). Parameters missing
    from ``params`` keep the module's own values, shared by all samples. See the module
    docstring for the fast paths and the BatchNorm policy.

    A forward that takes ``use_cache`` (transformers models) runs with ``use_cache=False``
    unless it is given: a cache is per-call state, which ``vmap`` cannot return.

    Args:
        downstream: Any module.
        params: Tensors keyed by parameter (or buffer) names, each ``(B, *shape)``; a subset.
        args: The positional input(s); every tensor in it is ``(B, *)``. Non-tensors are passed
            to every call as they are.
        kwargs: Keyword inputs, batched like ``args``.
        shared: Keyword inputs passed to every call as they are, not batched: e.g. an
            ``attention_mask`` of shape ``(N, L)`` that every sample uses.

    Returns:
        What ``downstream`` returns, with a leading dimension ``B`` on every tensor.

    Raises:
        ValueError: Unknown names, shapes that are not ``(B, *shape)``, inputs whose leading
            dimension is not ``B``, a name in both ``kwargs`` and ``shared``; a forward whose
            control flow depends on the values of a batched input, or that returns something
            other than tensors (a cache), each with the way around it.
        TypeError: ``params`` is not a dict of tensors.

    Example:
        >>> from torchhyper import HyperNetwork
        >>> downstream = nn.Linear(3, 2)
        >>> hypernetwork = HyperNetwork(5, [16], downstream)
        >>> c, x = torch.randn(8, 5), torch.randn(8, 3)       # a context and an input each
        >>> params = hypernetwork.per_sample(c)              # (B, *shape) each
        >>> params["weight"].shape
        torch.Size([8, 2, 3])
        >>> per_sample_call(downstream, params, x).shape     # y[i] = downstream_i(x[i])
        torch.Size([8, 2])
    """
    args = args if isinstance(args, tuple) else (args,)
    kwargs = {} if kwargs is None else kwargs
    batch, index = _check(downstream, params, args, kwargs)
    ctx = _Context(dict(params), index.names, batch)
    ctx.fast = not _global_hooks()
    if shared:
        both = sorted(set(kwargs) & set(shared))
        if both:
            raise ValueError(
                f"{both} given in both kwargs (batched) and shared (not batched): pass each once"
            )
        return _vmapped(downstream, args, kwargs, ctx, shared)
    if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
        plan = index.plan(downstream) if ctx.fast else None
        if plan is None:
            return _forward(downstream, args[0], ctx)
        return _run(plan, args[0], ctx)
    return _vmapped(downstream, args, kwargs, ctx)


class _Plan(NamedTuple):
    """The leaves of a tree of ``nn.Sequential``, in order, with their fast handlers."""

    steps: list[tuple[nn.Module, _Handler | None]]
    rows: bool  # whether to run per-sample vectors as rows: see _run

    @classmethod
    def of(cls, steps: list[tuple[nn.Module, _Handler | None]]) -> _Plan:
        # Rows need every step to be row-wise, and pay off when a Linear saves its reshapes.
        rowwise = all(fast in _ROWWISE for _, fast in steps)
        return cls(steps, rowwise and any(fast is _linear for _, fast in steps))


def _run(plan: _Plan, x: Tensor, ctx: _Context) -> Any:
    """Runs the steps of ``plan`` on a batched input ``x`` (B, *), each by its fast handler
    when it has one and no hooks, else under vmap."""
    # Per-sample vectors (B, D) go through row-wise steps as (B, 1, D): one row per sample, the
    # layout of a batched matrix product, so that no layer reshapes (nor its backward).
    rows = plan.rows and x.dim() == 2
    if rows:
        x = x.unsqueeze(1)
    for module, fast in plan.steps:
        if fast is not None and not (  # _has_hooks, inline: it runs for every layer
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
        ):
            y = fast(module, x, ctx)
            if y is not NotImplemented:
                x = y
                continue
        if rows:  # what vmap runs, and hooks see, is each sample as the caller gave it
            x, rows = x.squeeze(1), False
        x = _vmapped(module, (x,), {}, ctx)
    return x.squeeze(1) if rows else x


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


def _forward(module: nn.Module, x: Tensor, ctx: _Context) -> Any:
    """One module on a batched input, by its fast path if it has one, else under vmap."""
    if ctx.fast and not _has_hooks(module):
        if type(module) is nn.Sequential:
            for child in module:
                x = _forward(child, x, ctx)
            return x
        fast = _FAST.get(type(module))
        if fast is not None:
            y = fast(module, x, ctx)
            if y is not NotImplemented:
                return y
    return _vmapped(module, (x,), {}, ctx)


def _global_hooks() -> bool:
    """Whether hooks registered for all modules exist, other than :func:`vmap_compatible`'s."""
    pre = _module._global_forward_pre_hooks
    return bool(
        _module._global_forward_hooks
        or _module._global_backward_hooks
        or (pre and any(h is not _contiguous_input for h in pre.values()))
    )


def _vmapped(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    ctx: _Context,
    shared: Mapping[str, Any] | None = None,
) -> Any:
    own = list(module.named_parameters()) + list(module.named_buffers())
    sub = {n: ctx.params[ctx.names[id(t)]] for n, t in own if ctx.names.get(id(t)) in ctx.params}
    # Train-mode BatchNorm updates its running statistics in place, which vmap only allows on
    # batched tensors: give each sample its own copy, then average the copies back.
    stats: dict[str, Tensor] = {}
    owners: dict[str, Tensor] = {}
    for name, m in module.named_modules():
        if (
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.training
            and m.running_mean is not None
        ):
            for attr in ("running_mean", "running_var"):
                key = f"{name}.{attr}" if name else attr
                if key not in sub:
                    owners[key] = getattr(m, attr)
                    stats[key] = owners[key].detach().expand(ctx.batch, *owners[key].shape).clone()

    common = dict(shared or {})
    if "use_cache" not in kwargs and "use_cache" not in common and _takes_use_cache(module):
        common["use_cache"] = False

    def call(
        p: dict[str, Tensor], s: dict[str, Tensor], a: tuple[Any, ...], k: dict[str, Any]
    ) -> Any:
        return functional_call(module, {**p, **s}, a, {**k, **common})

    dims = tree_map(lambda t: 0 if isinstance(t, Tensor) else None, (args, kwargs))
    try:
        with vmap_compatible():
            out = torch.func.vmap(call, in_dims=(0, 0, *dims), randomness="different")(
                sub, stats, args, kwargs
            )
    except (RuntimeError, ValueError) as err:
        _explain_vmap_error(module, err, kwargs)
        raise
    with torch.no_grad():
        for key, copies in stats.items():
            owners[key].copy_(copies.mean(0))
    return out
