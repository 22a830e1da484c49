r"""Saving and restoring a trained hypernetwork with everything its outputs depend on.

A hypernetwork's ``state_dict`` holds the hypernetwork alone: the downstream is not registered
in it. What the downstream keeps itself (BatchNorm's running statistics and other buffers, and
the parameters that ``include``/``exclude`` leave out of the generated ones) is not in it, so
a hypernetwork reloaded onto a fresh downstream runs with fresh buffers. :func:`checkpoint_state`
gathers both parts (and an optimizer's state); :func:`load_checkpoint_state` checks every part
before it writes any.

Example:
    >>> from torchhyper import HyperNetwork
    >>> downstream = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    >>> hypernetwork = HyperNetwork(3, [16], downstream)
    >>> optimizer = torch.optim.Adam(hypernetwork.parameters())
    >>> state = checkpoint_state(hypernetwork, downstream, optimizer)
    >>> sorted(state)
    ['downstream', 'hypernetwork', 'optimizer']
    >>> list(state["downstream"])  # what the hypernetwork does not hold
    ['1.running_mean', '1.running_var', '1.num_batches_tracked']
    >>> # torch.save(state, "checkpoint.pt"), and later, on a hypernetwork built alike:
    >>> load_checkpoint_state(hypernetwork, state, downstream, optimizer)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from torchhyper._record import _capped, _only_in

__all__ = ["checkpoint_state", "load_checkpoint_state"]


def checkpoint_state(
    hypernetwork: nn.Module,
    downstream: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    r"""Everything needed to restore a trained hypernetwork: its state dict, the downstream's
    own tensors that the hypernetwork does not generate, and the optimizer's state.

    Args:
        hypernetwork: A :class:`~torchhyper.HyperNetwork` or
            :class:`~torchhyper.EmbeddingHyperNetwork`.
        downstream: Its downstream; default: the module it was built on.
        optimizer: An optimizer to save as well.

    Returns:
        ``{"hypernetwork": state_dict, "downstream": {name: tensor}}`` (the downstream's
        ``state_dict`` without the generated parameters: buffers, and parameters that are not
        generated), plus ``"optimizer"`` when one is given. Tensors are detached copies.
    """
    module = _downstream(hypernetwork, downstream)
    generated = set(_generated(hypernetwork))
    own = {k: v.detach().clone() for k, v in module.state_dict().items() if k not in generated}
    state: dict[str, Any] = {"hypernetwork": hypernetwork.state_dict(), "downstream": own}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    return state


def load_checkpoint_state(
    hypernetwork: nn.Module,
    state: Mapping[str, Any],
    downstream: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    r"""Restores what :func:`checkpoint_state` saved, into a hypernetwork built alike (the same
    downstream architecture and arguments).

    Every part is checked before anything is written: the downstream's keys and shapes, the
    optimizer's parameter groups, and the hypernetwork's record, keys and shapes (its own
    ``load_state_dict``). A state that does not fit raises and leaves all three as they were.

    Args:
        hypernetwork: The hypernetwork to load into.
        state: What :func:`checkpoint_state` returned (e.g. ``torch.load(path)``).
        downstream: Its downstream; default: the module it was built on.
        optimizer: An optimizer to restore too; the state must then hold ``"optimizer"``.

    Raises:
        ValueError: ``state`` is not a checkpoint state, or its downstream part or optimizer
            state does not fit.
        RuntimeError: The hypernetwork's state dict does not fit (as ``load_state_dict``).
    """
    needed = ["hypernetwork", "downstream"] + (["optimizer"] if optimizer is not None else [])
    if not isinstance(state, Mapping) or any(k not in state for k in needed):
        got = list(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"state must be what checkpoint_state(...) returned, with keys {needed}; got {got}"
        )
    module = _downstream(hypernetwork, downstream)
    _check_downstream_part(module, _generated(hypernetwork), state["downstream"])
    if optimizer is not None:
        _check_optimizer(optimizer, state["optimizer"])
    hypernetwork.load_state_dict(state["hypernetwork"])  # checks all, then writes
    module.load_state_dict(state["downstream"], strict=False)  # checked above
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])


def _downstream(hypernetwork: nn.Module, downstream: nn.Module | None) -> nn.Module:
    if downstream is not None:
        if not isinstance(downstream, nn.Module):
            raise TypeError(f"downstream must be an nn.Module, got {type(downstream).__name__}")
        return downstream
    watch = getattr(hypernetwork, "_watch", None)
    if watch is None:
        raise TypeError(
            "hypernetwork must be a HyperNetwork or an EmbeddingHyperNetwork, got "
            f"{type(hypernetwork).__name__}"
        )
    module = watch.module()
    if module is None:
        raise ValueError(
            "the downstream the hypernetwork was built on is gone (or it was unpickled): pass "
            "it, downstream=..."
        )
    return module  # type: ignore[no-any-return]


def _generated(hypernetwork: nn.Module) -> list[str]:
    names = getattr(hypernetwork, "names", None)
    if not isinstance(names, list):
        raise TypeError(
            "hypernetwork must be a HyperNetwork or an EmbeddingHyperNetwork, got "
            f"{type(hypernetwork).__name__}"
        )
    return names


def _check_downstream_part(module: nn.Module, generated: list[str], saved: Any) -> None:
    if not isinstance(saved, Mapping):
        raise ValueError(
            f"state['downstream'] must map names to tensors, got {type(saved).__name__}"
        )
    skip = set(generated)
    expected = {k: v for k, v in module.state_dict().items() if k not in skip}
    wrong = [
        f"{k}: saved {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, "
        f"the downstream has {tuple(expected[k].shape)}"
        for k, v in saved.items()
        if k in expected
        and isinstance(expected[k], Tensor)
        and (not isinstance(v, Tensor) or v.shape != expected[k].shape)
    ]
    problems = _only_in(expected, "missing", saved, "unexpected") + _capped(
        wrong, "keys of wrong shape"
    )
    if problems:
        raise ValueError(
            "state['downstream'] does not fit the downstream (nothing was loaded): "
            + "; ".join(problems)
            + ". Load it into a downstream of the architecture it was saved from"
        )


def _check_optimizer(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list):
        raise ValueError("state['optimizer'] must be an optimizer's state_dict()")
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", [])) for g in groups]
    if ours != theirs:
        raise ValueError(
            f"state['optimizer'] holds parameter groups of sizes {theirs}, the optimizer "
            f"{ours} (nothing was loaded): build the optimizer as when it was saved"
        )
