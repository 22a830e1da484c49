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

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules import module as _module
from torch.utils._pytree import tree_map

from torchhyper._fast_layers import _FAST, _Context
from torchhyper._kwargs import _explain_vmap_error, _takes_use_cache
from torchhyper._per_sample_index import _check, _has_hooks, _Plan
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
