r"""The part every hypernetwork shares: from an embedding to a dict of downstream parameters.

:class:`_Generator` holds what is known of the downstream (names, shapes, scales), the base, the
head and the assembly. :class:`~torchhyper.HyperNetwork` (conditioned on a set or on each
example) and :class:`~torchhyper.EmbeddingHyperNetwork` (conditioned on integer ids) differ only
in how they produce the embedding ``z`` of shape ``(*, H)`` that :meth:`_Generator.generate`
maps to parameters of shape ``(*, *shape)``.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from torchhyper._checks import module
from torchhyper._drift import _check, _Watch
from torchhyper._record import _SHOWN, _few, _Recorded
from torchhyper._spec import _describe, _lazy_names, _select
from torchhyper.heads.build import _make_head
from torchhyper.heads.head import Head, HeadFactory, _has_zero_row

__all__: list[str] = []

BASES = ("learned", "frozen", "none")
"""The choices of ``base=``: see :class:`~torchhyper.HyperNetwork`."""

# The running mean of the embeddings averages about the last 1 / _CENTER_RATE training calls
# (every call so far, while there are fewer).
_CENTER_RATE = 0.01


class _Generator(_Recorded):
    r"""Base class: ``generate(z)`` maps embeddings ``(*, H)`` to downstream parameters.

    Subclasses check their arguments and the downstream (:func:`_check_downstream`) before they
    build anything, then build their embedding modules, then call :meth:`_build`.

    Dtypes. Each tensor is generated in the dtype its downstream tensor had at construction
    (``float16``, ``bfloat16``, ``float32`` or ``float64``), so that ``functional_call`` gets
    what the downstream computes in. The hypernetwork computes in the wider of that dtype and
    PyTorch's default: ``float32`` for a ``float16`` or ``bfloat16`` downstream (its weights, base
    and optimizer stay in full precision; the result is cast), ``float64`` for a ``float64``
    downstream (the hypernetwork is then built in ``float64``: its base holds the downstream's
    values exactly, and it reads ``float64`` inputs). Convert the downstream *before* building
    the hypernetwork. Complex, integer and meta-device parameters, and TorchScript modules, are
    refused at construction.

    State dict. ``state_dict()`` records what is generated, the names and shapes, under
    ``_extra_state``. ``load_state_dict`` checks it, and every key and shape, before it writes
    anything: a state dict saved for another downstream (weights for a ``(3, 4)`` tensor loaded
    into a hypernetwork that generates ``(4, 3)``), or with other keys or shapes, raises a
    ``RuntimeError`` that lists every difference and leaves the hypernetwork as it was. With
    ``strict=False`` the record is not compared (load the matching parts, e.g. the encoder, of
    a hypernetwork built for another downstream); shapes still are. A state dict without the
    record (saved by an older torchhyper) loads after the checks of keys and shapes, with a
    warning.
    """

    names: list[str]
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    numels: list[int]
    numel: int
    init: str
    base: str
    # Buffers (the last two with a base only).
    scale: Tensor
    offset: Tensor
    center: Tensor
    center_calls: Tensor
    # The checks of each call (downstream drift, non-finite embeddings); off only to measure
    # what they cost (benchmarks/heads.py).
    _guard: bool = True
    _watch: _Watch | None = None  # None: unpickled from a version without it

    def _build(
        self,
        downstream: nn.Module,
        names: list[str],
        in_features: int,
        *,
        head: Union[str, HeadFactory],
        base: Literal["learned", "frozen", "none"],
    ) -> None:
        """Describes the downstream's tensors ``names`` (what :func:`_check_downstream`
        returned) and builds the norm, base, head and gains."""
        params = dict(downstream.named_parameters())

        self.base = base
        self.init = "default" if base == "none" else "downstream"
        self.names = names
        self.shapes = [params[n].shape for n in names]
        self.numels = [params[n].numel() for n in names]
        self.numel = sum(self.numels)
        self.dtypes = [params[n].dtype for n in names]
        # The dtype the hypernetwork computes in (see the class docstring).
        default = torch.get_default_dtype()
        dtype = functools.reduce(torch.promote_types, self.dtypes, default)

        # What the downstream holds now, checked at every call (torchhyper._drift).
        self._watch = _Watch(downstream, names, self.shapes, self.dtypes)
        # Gives the head an embedding of zero mean and unit variance, whatever the input scale.
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False)

        if base == "none":
            self.head = _make_head(head, in_features, self.shapes, bases=None)
            # Full generation: offset + scale * gain * h, at the statistics of the default init.
            specs = _describe(downstream, names)
            gain = [0.0 if s.constant else 1.0 for s in specs]
            self.gain = nn.Parameter(torch.tensor(gain))
            self.register_buffer("scale", torch.tensor([s.scale for s in specs]))
            self.register_buffer("offset", torch.tensor([s.offset for s in specs]))
            self.bases = None
            if dtype != default:
                self.to(dtype)
            return
        # A base in weight units, at the downstream's current values: Adam on it moves every
        # weight as training the downstream directly would. The head adds a conditioned update,
        # zero at init, on the centered embedding.
        values = [params[n].detach().to("cpu", dtype, copy=True) for n in names]
        self.head = _make_head(head, in_features, self.shapes, bases=values)
        self.bases = nn.ParameterList(
            [nn.Parameter(v, requires_grad=base == "learned") for v in values]
        )
        if self.head.scales_base:
            _warn_unmoved(self.head, names, values, frozen=base == "frozen")
        starts_at_zero = self.head.zero_update_()
        self.gain = nn.Parameter(torch.full((len(names),), 1.0 if starts_at_zero else 0.0))
        self.register_buffer("scale", torch.tensor([_spread(v) for v in values]))
        self.register_buffer("center", torch.zeros(in_features))
        self.register_buffer("center_calls", torch.zeros((), dtype=torch.long))
        if dtype != default:
            self.to(dtype)  # the modules built so far, in the default dtype

    def generate(self, z: Tensor) -> dict[str, Tensor]:
        r"""Maps embeddings ``(*, H)`` to parameters of shape ``(*, *shape)`` each.

        Args:
            z: Embeddings, ``(*, H)``; ``*`` may be empty (one parameter set) or a batch.

        Returns:
            The generated parameters, keyed and ordered like ``downstream.named_parameters()``,
            each in the dtype of its downstream tensor.
        """
        if self._guard and self._watch is not None and not torch.compiler.is_compiling():
            _check(self._watch, self.gain.device)
        z = self.norm(z)
        batch = z.shape[:-1]
        if self.bases is None:
            values = self.head.assemble(z, self.offset.unbind(), self.scale, self.gain)
        else:
            bases = [b.view(-1) for b in self.bases]
            values = self.head.assemble(self._centered(z), bases, self.scale, self.gain)
        return {
            name: v.view(batch + shape).to(dtype)
            for name, v, shape, dtype in zip(self.names, values, self.shapes, self.dtypes)
        }

    def _centered(self, z: Tensor) -> Tensor:
        """``z`` minus the running mean of the embeddings; in training mode, the mean then
        takes in ``z``. (Centering on a mean that already holds ``z`` would give the first
        call an update of exactly zero and the next ones tiny gradients, which Adam blows up
        to full steps: rounding noise would then steer the first steps.)

        Embeddings with a non-finite value (from a non-finite input) are left out of the mean,
        with a warning: the running mean never holds one, and each row's update reads the mean
        as it was before the call, so one bad row spoils no other, in this call or later."""
        centered = z - self.center
        if self.training:
            with torch.no_grad():
                rows = z.detach().reshape(-1, z.shape[-1])
                finite = torch.isfinite(rows).all(-1)
                count = finite.sum()
                # Without a branch on the values (torch.compile, no host sync): a call with no
                # finite row moves neither the mean nor the count of calls.
                mean = torch.where(finite.unsqueeze(-1), rows, 0).sum(0) / count.clamp(min=1)
                moved = count > 0
                self.center_calls += moved
                calls = self.center_calls.clamp(min=1).reciprocal().clamp(min=_CENTER_RATE)
                rate = torch.where(moved, calls, 0).to(self.center.dtype)
                self.center.add_((mean - self.center) * rate)
                if self._guard and _can_read(z) and not bool(finite.all()):
                    warnings.warn(
                        f"{int(len(rows) - count)} of {len(rows)} embeddings in this training "
                        "call are not finite (NaN or inf in the input, or an overflow): their "
                        "outputs are not finite, and they are left out of the running mean of "
                        "the embeddings, which stays as it was for them; skip the optimizer "
                        "step on a non-finite loss",
                        UserWarning,
                        stacklevel=4,
                    )
        return centered

    def rebase_(self, downstream: nn.Module | None = None) -> None:
        r"""Takes the downstream's current values as the base, in place: after a checkpoint was
        loaded into the downstream, or its weights were changed otherwise, since construction.
        The update (the head) is kept as it is.

        Args:
            downstream: The module to read, with the names and shapes the hypernetwork was built
                on; default: the downstream it was built on.

        Raises:
            ValueError: ``base="none"`` (no base to set), the downstream is gone, or its names,
                shapes or dtypes differ from construction's (nothing is written).
        """
        if self.bases is None:
            raise ValueError(
                "rebase_ needs a base, but this hypernetwork has base='none' (it generates "
                "every value and copies none); build it with base='learned' or 'frozen'"
            )
        watch = self._watch
        module = downstream if downstream is not None or watch is None else watch.module()
        if module is None or watch is None:
            raise ValueError(
                "the downstream the hypernetwork was built on is gone: pass one, "
                "hypernetwork.rebase_(downstream)"
            )
        if downstream is not None:  # the record of construction, on the module given
            watch = copy.deepcopy(watch)
            watch.ref = weakref.ref(downstream)
        lines = watch.problems()
        if lines:
            raise ValueError(
                "rebase_ needs the names, shapes and dtypes the hypernetwork was built on: "
                + "; ".join(lines)
            )
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, base in zip(self.names, self.bases):
                base.copy_(params[name].detach())

    def _load_problems(
        self, state_dict: dict[str, Any], prefix: str, strict: bool | None
    ) -> list[str]:
        problems = super()._load_problems(state_dict, prefix, strict)
        hint = self.head.load_hint(state_dict, prefix + "head.", self.names) if problems else ""
        return [*problems, hint] if hint else problems

    def _generated_repr(self) -> str:
        own = sum(p.numel() for p in self.parameters() if p.requires_grad)
        reason = f" ({self.head.reason})" if self.head.reason else ""
        return (
            f"generated={len(self.names)} tensors ({self.numel} values), base={self.base!r}, "
            f"head={type(self.head).__name__}{reason}, "
            f"trained={own} ({own / self.numel:.3g}x generated)"
        )


def _check_downstream(
    downstream: nn.Module,
    *,
    include: str | list[str] | None,
    exclude: str | list[str] | None,
    init: Literal["default", "downstream"] | None,
    base: Literal["learned", "frozen", "none"],
) -> list[str]:
    """Checks ``downstream`` and the options that say what is generated from it; returns the
    names to generate. Changes nothing and draws no random numbers, so that a constructor can
    call it before it builds anything, and hand the names to :meth:`_Generator._build`."""
    module("downstream", downstream)
    if isinstance(downstream, torch.jit.ScriptModule):
        raise TypeError(
            f"downstream is a TorchScript module ({type(downstream).__name__}): "
            "torch.func.functional_call cannot replace its parameters, so nothing generated "
            "could be applied to it; pass the nn.Module itself, before torch.jit.script or "
            "torch.jit.trace"
        )
    if base not in BASES:
        raise ValueError(f"base must be one of {list(BASES)}, got {base!r}")
    if init not in (None, "default", "downstream"):
        raise ValueError(f"init must be 'default' or 'downstream', got {init!r}")
    if base == "none" and init == "downstream":
        raise ValueError(
            "init='downstream' needs a base: use base='frozen' (or 'learned') to start at "
            "the downstream's current values"
        )
    if base != "none" and init == "default":
        raise ValueError(
            f"init='default' draws every tensor from PyTorch's default init and needs "
            f"base='none'; base={base!r} starts at the downstream's current values"
        )
    lazy = _lazy_names(downstream)
    if lazy:
        raise ValueError(
            f"the downstream has uninitialized lazy parameters {lazy}: run one forward "
            "pass of the downstream on an example input before building the hypernetwork"
        )
    params = dict(downstream.named_parameters())
    if not params:
        raise ValueError(
            f"the downstream {type(downstream).__name__} has no parameters to generate"
        )
    on_meta = [n for n, p in params.items() if p.is_meta]
    if on_meta:
        raise ValueError(
            f"downstream parameters {_few(on_meta)} are on the meta device (they hold no "
            "values), but the hypernetwork starts from the downstream's values (its base, or "
            "with base='none' their statistics): materialize the downstream first, e.g. "
            "downstream.to_empty(device='cpu'), then initialize it or load its weights"
        )
    names = _select(list(params), include, exclude)
    not_real = [n for n in names if not params[n].is_floating_point()]
    if not_real:
        shown = ", ".join(f"{n} ({params[n].dtype})" for n in not_real[:_SHOWN])
        complex_ = any(params[n].is_complex() for n in not_real)
        raise TypeError(
            f"downstream parameters to generate must be real floating point, got {shown}"
            + (" ..." if len(not_real) > _SHOWN else "")
            + (
                ": a complex tensor would be generated as real, losing its imaginary part. "
                "Hold it as a real parameter of shape (*, 2) (torch.view_as_real) and rebuild "
                "it in forward (torch.view_as_complex), or"
                if complex_
                else ":"
            )
            + f" leave them to the module with exclude={not_real[:_SHOWN]!r}"
        )
    return names


def _can_read(t: Tensor) -> bool:
    """Whether ``t``'s values can be read on the host now: not while compiling, not on meta."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def _warn_unmoved(head: Head, names: list[str], values: list[Tensor], *, frozen: bool) -> None:
    """Warns of the matrices that ``head``, whose update scales the base's rows, cannot move:
    those with a row of zeros (all of their rows, for PEFT's ``lora_B``)."""
    unmoved = [n for n, v in zip(names, values) if v.dim() >= 2 and _has_zero_row(v)]
    if not unmoved:
        return
    fate = (
        "never move (their base is frozen)"
        if frozen
        else "get no conditioned update until their base moves away from zero"
    )
    warnings.warn(
        f"head {type(head).__name__} scales each row of a base, so rows of zeros stay zero: "
        f"{_few(unmoved)} have zero rows and {fate}; use head='auto' or 'hybrid' (an additive "
        "update that moves any tensor), or exclude them",
        UserWarning,
        stacklevel=4,
    )


def _mlp(in_features: int, sizes: Sequence[int], activation: type[nn.Module]) -> nn.Sequential:
    """Linear layers of widths ``sizes``, each followed by ``activation()`` (empty: identity)."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip([in_features, *sizes[:-1]], sizes):
        layers += [nn.Linear(n_in, n_out), activation()]
    return nn.Sequential(*layers)


def _spread(value: Tensor) -> float:
    """The scale of an update to ``value``: the root mean square of its values (1 for zeros).

    The RMS rather than the std: a tensor of two values (a mixture's means) has a spread that
    says little of the range its values take, and a constant (a norm's scale of 1) is updated
    in units of itself."""
    rms = torch.linalg.vector_norm(value).item() / value.numel() ** 0.5 if value.numel() else 0.0
    return rms if rms > 0 else 1.0
