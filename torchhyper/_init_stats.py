r"""The init statistics of a downstream's tensors, for full generation (``base="none"``).

With ``base="none"`` each tensor is generated at a mean ``offset`` and a spread ``spread``, so
that it starts at the scale its init gives it, layer by layer (Chang et al. 2020). One rule,
whatever library initialized the downstream:

* **The values the downstream holds.** A tensor's statistics are those of its values at
  construction. PyTorch's default init, transformers' ``_init_weights``, PEFT's zero ``lora_B``,
  diffusers' ``zero_module`` or the user's own code are followed without being known.
* **Re-drawn where they are few.** Fewer than 4096 values say little of a spread (a bias of 8
  values: 25 % error). Such a tensor is re-drawn from the downstream's own init, on a copy that
  holds only the small tensors (the others are meta tensors: no memory, no work): PyTorch's
  ``reset_parameters``, children before parents as construction runs them; then, inside a
  transformers model, its ``_init_weights`` on every submodule as ``post_init`` applies it
  (except PEFT's adapters, which are injected after it). Draws are pooled over the layers of a
  stack (names that differ only in indices) up to 4096 values. They replace the held values'
  statistics only where the two agree (the same constant, or a spread and mean within sampling
  error): a tensor that something else set keeps its own statistics.
* **Constants.** A tensor whose values are all equal (a norm's 1, a zero bias, a zero
  ``lora_B``) starts exactly at its value, and so does a one-value tensor that no init
  re-draws. A mean within four standard errors of 0 is taken as 0.

On a pretrained downstream the rule gives the statistics of its trained values. For those of the
architecture's fresh init, build the hypernetwork on a fresh construction of the same class
(``type(model)(model.config)``: the names are the same) and apply it to the pretrained module.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torchhyper._names import _walk

__all__: list[str] = []

# Values for a precise estimate: a spread within about 1 %, a mean within 0.05 std.
_MIN_SAMPLES = 4096
# Bounds on the re-draws, so that a downstream of many small tensors builds in a second or two.
_MAX_ROUNDS = 512
_MAX_DRAWN_VALUES = 20_000_000
_MAX_INIT_CALLS = 50_000
_SEED = 0x5EED_CAFE
# What an init that cannot run on the copy (meta tensors, missing arguments) raises.
_INIT_ERRORS = (TypeError, RuntimeError, NotImplementedError, ValueError, AttributeError)


@dataclass(frozen=True)
class _TensorSpec:
    """How full generation starts a tensor: ``offset + spread * gain * h``."""

    offset: float  # mean of the init distribution
    spread: float  # std of the init distribution, or a nominal 1 for constants
    constant: bool  # the init (or the user) sets it to a fixed value


@dataclass(frozen=True)
class _Stats:
    """Summary statistics of a set of values."""

    count: int
    mean: float
    std: float  # the sample std; 0 for one value
    low: float
    high: float

    @staticmethod
    def of(values: Tensor) -> _Stats:
        # Three fast float32 reductions, no float64 copy: PyTorch sums in cascades, accurate
        # to about 1e-7 of the values even for a 38 M-value embedding.
        v = values.detach().reshape(-1)
        if v.dtype not in (torch.float32, torch.float64):
            v = v.float()
        n = v.numel()
        if n == 0:
            return _Stats(0, 0.0, 0.0, 0.0, 0.0)
        if n <= 64:  # a few values: in Python, faster than four reductions (10,000 biases)
            xs = v.tolist()
            mean = math.fsum(xs) / n
            var = math.fsum((x - mean) ** 2 for x in xs) / max(n - 1, 1)
            return _Stats(n, mean, math.sqrt(var), min(xs), max(xs))
        low, high = (x.item() for x in torch.aminmax(v))
        mean = v.sum().item() / n
        square = torch.linalg.vector_norm(v).item() ** 2 / n
        if square - mean**2 < 1e-3 * square:  # a spread small against the mean: center first
            square = torch.linalg.vector_norm(v - mean).item() ** 2 / n + mean**2
        var = max(square - mean**2, 0.0) * n / max(n - 1, 1)
        return _Stats(n, mean, math.sqrt(var), low, high)

    @property
    def constant(self) -> bool:
        return self.high - self.low <= 1e-7 * (1.0 + abs(self.mean))


def _describe(downstream: nn.Module, names: list[str]) -> list[_TensorSpec]:
    """The init statistics of each named parameter, by the rule of the module docstring."""
    params = dict(downstream.named_parameters())
    held = {n: _Stats.of(params[n]) for n in names}
    drawn = _redraw(downstream, [n for n in names if 0 < params[n].numel() < _MIN_SAMPLES])
    specs = []
    for n in names:
        stats = held[n]
        if n in drawn and _agrees(held[n], drawn[n]):
            stats = drawn[n]
        specs.append(_spec(stats))
    return specs


def _spec(stats: _Stats) -> _TensorSpec:
    if stats.count <= 1 or stats.constant:
        return _TensorSpec(stats.mean, 1.0, True)
    n = stats.count
    if abs(stats.mean) <= 4 * stats.std / math.sqrt(n):  # no evidence of an offset
        # The spread about 0: the root mean square (no degree of freedom spent on a mean).
        rms = math.sqrt(stats.std**2 * (n - 1) / n + stats.mean**2)
        return _TensorSpec(0.0, rms, False)
    return _TensorSpec(stats.mean, stats.std, False)


def _agrees(held: _Stats, drawn: _Stats) -> bool:
    """Whether the held values could be a draw of the re-drawn init (4 standard errors)."""
    if drawn.count <= 1:
        return False
    if drawn.constant:
        return held.constant and abs(held.mean - drawn.mean) <= 1e-7 * (1.0 + abs(drawn.mean))
    if held.count == 1:  # a random draw is never exactly an integer (a 0 that a library set)
        return drawn.low <= held.mean <= drawn.high and not held.mean.is_integer()
    if held.constant or held.std <= 0.0:
        return False
    n = held.count
    if abs(math.log(held.std / drawn.std)) > 4 / math.sqrt(2 * (n - 1)) + 0.05:
        return False
    return abs(held.mean - drawn.mean) <= 4 * drawn.std * math.sqrt(1 / n + 1 / drawn.count)


@dataclass
class _Group:
    """Tensors that one init draws alike (the same name up to indices, the same shape)."""

    names: list[str]
    numel: int
    drawn: list[str] = field(default_factory=list)  # the members re-drawn: enough for 4096
    chain: set[str] = field(default_factory=set)  # the drawn members' owners and all above them
    draws: list[Tensor] = field(default_factory=list)
    done: bool = False


def _redraw(downstream: nn.Module, names: list[str]) -> dict[str, _Stats]:
    """Statistics of fresh draws of ``names`` from the downstream's own init, pooled by group;
    a name that no init touches is left out."""
    params = dict(downstream.named_parameters())
    initialized = {path for path, _, reset, init in _plan(downstream) if reset or init}
    groups: dict[tuple[str, tuple[int, ...]], _Group] = {}
    for n in names:
        if not _chain(n) & initialized:
            continue  # nothing re-draws it: its held values describe it
        key = (".".join("#" if p.isdigit() else p for p in n.split(".")), tuple(params[n].shape))
        groups.setdefault(key, _Group([], params[n].numel())).names.append(n)
    if not groups:
        return {}
    for g in groups.values():  # a stack of many layers needs draws of a few of them only
        g.drawn = g.names[: -(-_MIN_SAMPLES // g.numel)]
        g.chain = set().union(*(_chain(n) for n in g.drawn))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        # A seed of its own: a user's seed would re-draw the first layers exactly as they are.
        torch.manual_seed(_SEED)
        scratch = _scratch(downstream)
        if scratch is None:
            return {}
        _draw(scratch, list(groups.values()), params)
    drawn = {}
    for g in groups.values():
        if g.drawn and g.draws:
            drawn.update(dict.fromkeys(g.names, _Stats.of(torch.cat(g.draws))))
    return drawn


def _draw(scratch: nn.Module, groups: list[_Group], params: Mapping[str, Tensor]) -> None:
    """Re-initializes ``scratch`` round by round, each round only the modules above the groups
    that still need draws, until each group holds ``_MIN_SAMPLES`` values or a budget is spent."""
    plan = _plan(scratch)
    places = {s.name: (s.owner, s.attr) for s in _walk(scratch) if s.kind == "_parameters"}
    live: list[_Group] = []
    resets: list[tuple[nn.Module, _Reset]] = []
    inits: list[tuple[nn.Module, _Init]] = []
    calls = values = 0
    for r in range(_MAX_ROUNDS):
        still = [
            g for g in groups if g.drawn and not g.done and len(g.draws) * g.numel < _MIN_SAMPLES
        ]
        if not still or calls > _MAX_INIT_CALLS or values > _MAX_DRAWN_VALUES:
            return
        if still != live:
            live = still
            active = set().union(*(g.chain for g in live))
            resets = [(m, f) for path, m, f, _ in plan if f is not None and path in active]
            inits = [(m, f) for path, m, _, f in plan if f is not None and path in active]
        for module, reset in resets:  # construction, children first
            _reset(module, reset)
        for module, init in inits:  # then the library's post-init
            _call(functools.partial(init, module))
        calls += len(resets) + len(inits)
        for g in live:
            got = [(n, _value(*places[n])) for n in g.drawn]
            if r == 0:  # what no init changed, its held values describe
                got = [(n, v) for n, v in got if not torch.equal(v, _value(params, n))]
                g.drawn = [n for n, _ in got]
            g.draws.extend(v for _, v in got)
            values += g.numel * len(got)
            if r == 0 and got and _Stats.of(torch.cat(g.draws)).constant:
                g.done = True  # a constant: more draws tell nothing


def _value(owner: nn.Module | Mapping[str, Tensor], attr: str) -> Tensor:
    """A flat float32 CPU copy of ``owner``'s parameter ``attr``."""
    table = owner._parameters if isinstance(owner, nn.Module) else owner
    return cast(Tensor, table[attr]).detach().to("cpu", torch.float32, copy=True).reshape(-1)


_Reset = Callable[[], Any]
_Init = Callable[[nn.Module], Any]


def _plan(module: nn.Module) -> list[tuple[str, nn.Module, _Reset | None, _Init | None]]:
    """Every module once, children before parents (as construction initializes them), with its
    PyTorch reset and the ``_init_weights`` of the transformers model it belongs to."""
    out: list[tuple[str, nn.Module, _Reset | None, _Init | None]] = []
    seen: set[int] = set()

    def visit(m: nn.Module, path: str, init: _Init | None) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        if callable(getattr(type(m), "_init_weights", None)):  # a transformers PreTrainedModel
            init = cast(_Init, m._init_weights)
        # PEFT's adapter layers (lora_A, lora_B, ...) come after the model's init.
        adapters = getattr(type(m), "adapter_layer_names", ())
        for name, child in m._modules.items():
            if child is not None:
                own = None if name in adapters else init
                visit(child, f"{path}.{name}" if path else name, own)
        reset = None
        for method in ("reset_parameters", "_reset_parameters"):
            if callable(getattr(type(m), method, None)):
                reset = cast(_Reset, getattr(m, method))
                break
        out.append((path, m, reset, init))

    visit(module, "", None)
    return out


def _chain(name: str) -> set[str]:
    """The paths of the module that holds ``name`` and of every module above it."""
    parts = name.split(".")[:-1]
    return {".".join(parts[:k]) for k in range(len(parts) + 1)}


def _scratch(downstream: nn.Module) -> nn.Module | None:
    """A copy of the downstream that holds float32 CPU copies of its small tensors and meta
    tensors in place of the others; tied tensors are untied, each alias holding a meta tensor
    (a tied tensor keeps the init of its first owner, as construction followed by tying gives
    it). None if the module cannot be copied."""
    memo: dict[int, Any] = {}
    for t in [*downstream.parameters(), *downstream.buffers()]:
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        if t.numel() < _MIN_SAMPLES:
            value = t.detach().to("cpu", dtype, copy=True)
        else:
            value = torch.empty(t.shape, dtype=dtype, device="meta")
        memo[id(t)] = (
            nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
        )
    try:
        scratch = copy.deepcopy(downstream, memo)
    except (RuntimeError, TypeError, AttributeError, ValueError, copy.Error) as error:
        warnings.warn(
            f"the downstream {type(downstream).__name__} cannot be copied ({type(error).__name__}: "
            f"{error}), so the init statistics of its tensors under {_MIN_SAMPLES} values come "
            "from their current values alone, not from fresh draws of its init; make it "
            "deep-copyable (e.g. no locks or open handles as attributes) for those",
            UserWarning,
            stacklevel=2,
        )
        return None  # the held values describe every tensor
    aliases = [s for s in _walk(scratch) if s.kind == "_parameters" and s.name != s.first]
    for s in aliases:
        meta = torch.empty(s.tensor.shape, dtype=torch.float32, device="meta")
        s.table[s.attr] = nn.Parameter(meta, requires_grad=False)
    return scratch


def _reset(module: nn.Module, reset: _Reset) -> None:
    if not parametrize.is_parametrized(module):
        _call(reset)
        return
    # A reset writes into the computed tensor (weight), not into its originals: let it write
    # into the cached tensor, then assign that through the right inverse.
    names = list(cast(nn.ModuleDict, module.parametrizations).keys())
    try:
        with parametrize.cached():
            reset()
            values = {t: getattr(module, t).clone() for t in names}
        for t, value in values.items():
            setattr(module, t, value)
    except _INIT_ERRORS:
        pass  # no right inverse, or an original on meta: its originals keep their values


def _call(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except _INIT_ERRORS:
        pass  # an init that cannot run on the copy: the held values describe its tensors
