r"""The part every hypernetwork shares: from an embedding to a dict of downstream parameters.

:class:`_Generator` holds what is known of the downstream (names, shapes, scales), the base, the
head and the assembly. :class:`~torchhyper.HyperNetwork` (conditioned on a set or on each
example) and :class:`~torchhyper.EmbeddingHyperNetwork` (conditioned on integer ids) differ only
in how they produce the embedding ``z`` of shape ``(*, H)`` that :meth:`_Generator.generate`
maps to parameters of shape ``(*, *shape)``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from torchhyper._checks import module
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
        to full steps: rounding noise would then steer the first steps.)"""
        centered = z - self.center
        if self.training:
            with torch.no_grad():
                self.center_calls += 1
                rate = self.center_calls.reciprocal().clamp(min=_CENTER_RATE).to(self.center.dtype)
                mean = z.detach().reshape(-1, z.shape[-1]).mean(0)
                self.center.add_((mean - self.center) * rate)
        return centered

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
