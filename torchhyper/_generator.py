r"""The part every hypernetwork shares: from an embedding to a dict of downstream parameters.

:class:`_Generator` holds what is known of the downstream (names, shapes, scales), the base, the
head and the assembly. :class:`~torchhyper.HyperNetwork` (conditioned on a set or on each
example) and :class:`~torchhyper.EmbeddingHyperNetwork` (conditioned on integer ids) differ only
in how they produce the embedding ``z`` of shape ``(*, H)`` that :meth:`_Generator.generate`
maps to parameters of shape ``(*, *shape)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import torch
from torch import Tensor, nn

from torchhyper._checks import module
from torchhyper._spec import _describe, _lazy_names, _select
from torchhyper.heads.build import _make_head
from torchhyper.heads.head import HeadFactory

__all__: list[str] = []

BASES = ("learned", "frozen", "none")
"""The choices of ``base=``: see :class:`~torchhyper.HyperNetwork`."""

# The running mean of the embeddings averages about the last 1 / _CENTER_RATE training calls
# (every call so far, while there are fewer).
_CENTER_RATE = 0.01


class _Generator(nn.Module):
    r"""Base class: ``generate(z)`` maps embeddings ``(*, H)`` to downstream parameters.

    Subclasses build their embedding modules first, then call :meth:`_build`.
    """

    names: list[str]
    shapes: list[torch.Size]
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
        in_features: int,
        *,
        include: str | list[str] | None,
        exclude: str | list[str] | None,
        head: Union[str, HeadFactory],
        init: Literal["default", "downstream"] | None,
        base: Literal["learned", "frozen", "none"],
    ) -> None:
        """Describes the downstream and builds the norm, base, head and gains."""
        module("downstream", downstream)
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
        all_names = [n for n, _ in downstream.named_parameters()]
        if not all_names:
            raise ValueError(
                f"the downstream {type(downstream).__name__} has no parameters to generate"
            )
        names = _select(all_names, include, exclude)
        params = dict(downstream.named_parameters())

        self.base = base
        self.init = "default" if base == "none" else "downstream"
        self.names = names
        self.shapes = [params[n].shape for n in names]
        self.numels = [params[n].numel() for n in names]
        self.numel = sum(self.numels)

        # Gives the head an embedding of zero mean and unit variance, whatever the input scale.
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False)
        self.head = _make_head(head, in_features, self.shapes, base=base != "none")

        if base == "none":
            # Full generation: offset + scale * gain * h, at the statistics of the default init.
            specs = _describe(downstream, names)
            gain = [0.0 if s.constant else 1.0 for s in specs]
            self.gain = nn.Parameter(torch.tensor(gain))
            self.register_buffer("scale", torch.tensor([s.scale for s in specs]))
            self.register_buffer("offset", torch.tensor([s.offset for s in specs]))
            self.bases = None
            return
        # A base in weight units, at the downstream's current values: Adam on it moves every
        # weight as training the downstream directly would. The head adds a conditioned update,
        # zero at init, on the centered embedding.
        values = [params[n].detach().to("cpu", torch.float32, copy=True) for n in names]
        self.bases = nn.ParameterList(
            [nn.Parameter(v, requires_grad=base == "learned") for v in values]
        )
        starts_at_zero = self.head.zero_update_()
        self.gain = nn.Parameter(torch.full((len(names),), 1.0 if starts_at_zero else 0.0))
        self.register_buffer("scale", torch.tensor([_spread(v) for v in values]))
        self.register_buffer("center", torch.zeros(in_features))
        self.register_buffer("center_calls", torch.zeros((), dtype=torch.long))

    def generate(self, z: Tensor) -> dict[str, Tensor]:
        r"""Maps embeddings ``(*, H)`` to parameters of shape ``(*, *shape)`` each.

        Args:
            z: Embeddings, ``(*, H)``; ``*`` may be empty (one parameter set) or a batch.

        Returns:
            The generated parameters, keyed and ordered like ``downstream.named_parameters()``.
        """
        z = self.norm(z)
        batch = z.shape[:-1]
        if self.bases is None:
            values = self.head.assemble(z, self.offset.unbind(), self.scale, self.gain)
        else:
            bases = [b.view(-1) for b in self.bases]
            values = self.head.assemble(self._centered(z), bases, self.scale, self.gain)
        return {
            name: v.view(batch + shape) for name, v, shape in zip(self.names, values, self.shapes)
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

    def _generated_repr(self) -> str:
        own = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return (
            f"generated={len(self.names)} tensors ({self.numel} values), base={self.base!r}, "
            f"trained={own} ({own / self.numel:.3g}x generated)"
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
