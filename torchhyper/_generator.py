r"""The part every hypernetwork shares: from an embedding to a dict of downstream parameters.

:class:`_Generator` holds what is known of the downstream (names, shapes, spreads), the base, the
head and the assembly. :class:`~torchhyper.HyperNetwork` (conditioned on a set or on each
example) and :class:`~torchhyper.EmbeddingHyperNetwork` (conditioned on integer ids) differ only
in how they produce the embedding ``z`` of shape ``(*, H)`` that :meth:`_Generator.generate`
maps to parameters of shape ``(*, *shape)``.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from torchhyper._drift import _check, _Watch
from torchhyper._init_stats import _describe
from torchhyper._record import _few, _Recorded
from torchhyper._spec import _Generated
from torchhyper.heads.build import _make_head
from torchhyper.heads.head import Head, HeadFactory, _has_zero_row

__all__: list[str] = []

# The running mean of the embeddings averages about the last 1 / _CENTER_RATE training calls
# (every call so far, while there are fewer).
_CENTER_RATE = 0.01


class _Generator(_Recorded):
    r"""Base class: ``generate(z)`` maps embeddings ``(*, H)`` to downstream parameters.

    A subclass checks its arguments and reads what it generates
    (:func:`~torchhyper._spec._what_to_generate`) before it builds anything, then builds its
    embedding modules, then calls :meth:`_build` once. The rules of dtypes and of the state
    dict are :class:`~torchhyper.HyperNetwork`'s.
    """

    # The base: one tensor per generated tensor, trained ("learned") or fixed ("frozen");
    # None with base="none" (as nn.Linear's bias is None without one).
    base: nn.ParameterList | None
    _base_choice: str  # "learned", "frozen" or "none"
    # Buffers (the last two with a base only).
    spread: Tensor
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
        generated: _Generated,
        in_features: int,
        *,
        head: Union[str, HeadFactory],
        base: str,
        norm: nn.Module | None = None,
    ) -> None:
        """Builds the norm (a LayerNorm over the ``in_features`` of the embedding unless
        ``norm`` is given), base, head and gains for ``generated`` (what
        :func:`~torchhyper._spec._what_to_generate` returned for ``downstream``)."""
        params = dict(downstream.named_parameters())
        self.generated = generated
        self._base_choice = base
        dtype = generated.compute_dtype
        # What the downstream holds now, checked at every call (torchhyper._drift).
        self._watch = _Watch(downstream, generated)
        # Gives the head an embedding of zero mean and unit variance, whatever the input scale.
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False) if norm is None else norm
        names = generated.names
        if base == "none":
            self.head = _make_head(head, in_features, generated.shapes, bases=None)
            # Full generation: offset + spread * gain * h, at the statistics of the default init.
            specs = _describe(downstream, names)
            gain = [0.0 if s.constant else 1.0 for s in specs]
            self.gain = nn.Parameter(torch.tensor(gain))
            self.register_buffer("spread", torch.tensor([s.spread for s in specs]))
            self.register_buffer("offset", torch.tensor([s.offset for s in specs]))
            self.base = None
        else:
            # A base in weight units, at the downstream's current values: Adam on it moves
            # every weight as training the downstream directly would. The head adds a
            # conditioned update, zero at init, on the centered embedding.
            values = [params[n].detach().to("cpu", dtype, copy=True) for n in names]
            self.head = _make_head(head, in_features, generated.shapes, bases=values)
            self.base = nn.ParameterList(
                [nn.Parameter(v, requires_grad=base == "learned") for v in values]
            )
            if self.head.scales_base:
                _warn_unmoved(self.head, names, values, frozen=base == "frozen")
            starts_at_zero = self.head.zero_update_()
            self.gain = nn.Parameter(torch.full((len(names),), 1.0 if starts_at_zero else 0.0))
            self.register_buffer("spread", torch.tensor([_spread(v) for v in values]))
            self.register_buffer("center", torch.zeros(in_features))
            self.register_buffer("center_calls", torch.zeros((), dtype=torch.long))
        if dtype != torch.get_default_dtype():
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
        if self.base is None:
            values = self.head.assemble(z, self.offset.unbind(), self.spread, self.gain)
        else:
            bases = [b.view(-1) for b in self.base]
            values = self.head.assemble(self._centered(z), bases, self.spread, self.gain)
        g = self.generated
        return {
            name: v.view(batch + shape).to(dtype)
            for name, v, shape, dtype in zip(g.names, values, g.shapes, g.dtypes)
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
        if self.base is None:
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
            for name, base in zip(self.names, self.base):
                base.copy_(params[name].detach())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # torchhyper 0.3 named the base "bases" and the spreads "scale": take its state dicts
        # (``state_dict`` is load_state_dict's own copy).
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix) :]
            if name == "scale" or name.startswith("bases."):
                new = "spread" if name == "scale" else "base." + name[len("bases.") :]
                state_dict.setdefault(prefix + new, state_dict.pop(key))
        super()._load_from_state_dict(state_dict, prefix, *args)

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
            f"generated={len(self.names)} tensors ({self.numel} values), "
            f"base={self._base_choice!r}, "
            f"head={type(self.head).__name__}{reason}, "
            f"trained={own} ({own / self.numel:.3g}x generated)"
        )


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
    """The spread of an update to ``value``: the root mean square of its values (1 for zeros).

    The RMS rather than the std: a tensor of two values (a mixture's means) has a spread that
    says little of the range its values take, and a constant (a norm's scale of 1) is updated
    in units of itself."""
    rms = torch.linalg.vector_norm(value).item() / value.numel() ** 0.5 if value.numel() else 0.0
    return rms if rms > 0 else 1.0
