r"""What a hypernetwork needs to know about its downstream: names, shapes and init statistics.

The statistics let the hypernetwork generate tensors at the scale PyTorch's default init gives
them (Chang et al. 2020): each selected tensor gets a mean ``offset`` and a ``scale``, measured by
re-running the downstream's own ``reset_parameters`` on a private copy several times. Tensors that
no reset touches (raw ``nn.Parameter``\ s of custom modules, parametrized originals) are described
by their current values. A tensor whose values never vary is a constant (norm scales of 1, shifts
of 0): it starts exactly at its value and learns from there.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchhyper._names import _walk

__all__: list[str] = []

# Enough draws that even a 1-element bias gets a std estimate within a few percent.
_MIN_SAMPLES = 4096
_MAX_RESETS = 512
# ...but bound the total work, so that a large downstream (a UNet) builds in a second or two.
_MAX_RESET_VALUES = 20_000_000


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: torch.Size
    offset: float  # mean of the init distribution
    scale: float  # std of the init distribution, or a nominal 1 for constants
    constant: bool  # PyTorch (or the user) sets it to a fixed value

    @property
    def numel(self) -> int:
        return self.shape.numel()


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


def _reset_all(module: nn.Module) -> None:
    # Children first, then parents: a parent's reset (e.g. MultiheadAttention zeroing its
    # out_proj bias) must override its children's, as it does at construction. A tied tensor
    # keeps the init of its first owner, as construction followed by tying gives it.
    aliases: dict[nn.Module, list[str]] = {}
    for slot in _walk(module):
        if slot.kind == "_parameters" and slot.name != slot.first:
            aliases.setdefault(slot.owner, []).append(slot.attr)

    def call_reset(m: nn.Module) -> None:
        for method in ("reset_parameters", "_reset_parameters"):
            fn = getattr(m, method, None)
            if callable(fn):
                try:
                    fn()
                except (TypeError, RuntimeError, NotImplementedError):
                    pass
                return

    def reset(m: nn.Module) -> None:
        kept = [
            (a, p.detach().clone())
            for a in aliases.get(m, [])
            if (p := m._parameters[a]) is not None
        ]
        if parametrize.is_parametrized(m):
            # A reset writes into the computed tensor (weight), not into its originals: let it
            # write into the cached tensor, then assign that through the right inverse.
            names = list(cast(nn.ModuleDict, m.parametrizations).keys())
            with parametrize.cached():
                call_reset(m)
                values = {t: getattr(m, t).clone() for t in names}
            for t, value in values.items():
                try:
                    setattr(m, t, value)
                except (RuntimeError, NotImplementedError, ValueError):
                    pass  # no right inverse: its originals keep their values
        else:
            call_reset(m)
        for a, value in kept:
            p = m._parameters[a]
            if p is not None:
                p.copy_(value)

    module.apply(reset)


def _init_samples(downstream: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """For each name, values drawn from the downstream's default init (pooled over resets)."""
    params = dict(downstream.named_parameters())
    numels = [params[n].numel() for n in names]
    total = sum(p.numel() for p in params.values())
    resets = min(_MAX_RESETS, -(-_MIN_SAMPLES // max(1, min(numels))))
    resets = max(1, min(resets, _MAX_RESET_VALUES // max(1, total)))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            scratch = copy.deepcopy(downstream).float().cpu()
            draws: dict[str, list[Tensor]] = {n: [] for n in names}
            copies = dict(scratch.named_parameters())
            for _ in range(resets):
                _reset_all(scratch)
                for n, k in zip(names, numels):
                    # Large tensors are well described by one draw.
                    if len(draws[n]) * k < _MIN_SAMPLES:
                        draws[n].append(copies[n].detach().flatten().clone())
    except (RuntimeError, TypeError, copy.Error):
        # Not copyable: describe each tensor by its current values.
        return {n: params[n].detach().float().cpu().flatten() for n in names}
    return {n: torch.stack(d) for n, d in draws.items()}


def _describe(downstream: nn.Module, names: list[str]) -> list[_TensorSpec]:
    params = dict(downstream.named_parameters())
    samples = _init_samples(downstream, names)
    specs = []
    for n in names:
        values = samples[n].double()
        mean = values.mean().item() if values.numel() else 0.0
        spread = (values - mean).abs().max().item() if values.numel() else 0.0
        constant = spread <= 1e-7 * (1.0 + abs(mean))
        std = 1.0 if constant else values.std(unbiased=values.numel() > 1).item()
        specs.append(_TensorSpec(n, params[n].shape, mean, std, constant))
    return specs


def _lazy_names(downstream: nn.Module) -> list[str]:
    uninit = nn.parameter.UninitializedParameter
    return [n for n, p in downstream.named_parameters() if isinstance(p, uninit)]
