r"""The part every hypernetwork shares: from an embedding to a dict of downstream parameters.

:class:`_Generator` holds what is known of the downstream (names, shapes, init statistics), the
head, and the per-tensor ``offset + scale * gain * h`` assembly. :class:`~torchhyper.HyperNetwork`
(conditioned on a set or on each example) and :class:`~torchhyper.EmbeddingHyperNetwork`
(conditioned on integer ids) differ only in how they produce the embedding ``z`` of shape
``(*, H)`` that :meth:`_Generator.generate` maps to parameters of shape ``(*, *shape)``.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from torch import Tensor, nn

from torchhyper._spec import _describe, _lazy_names, _select
from torchhyper.heads import Head, HeadFactory, _assemble, _make_head

__all__: list[str] = []


class _Generator(nn.Module):
    r"""Base class: ``generate(z)`` maps embeddings ``(*, H)`` to downstream parameters.

    Subclasses build their embedding modules first, then call :meth:`_build`, so that the
    state dict reads ``gain, scale, offset, counts, <embedding modules>, head.*``.
    """

    names: list[str]
    shapes: list[torch.Size]
    numels: list[int]
    numel: int
    init: str

    def _build(
        self,
        downstream: nn.Module,
        in_features: int,
        *,
        include: str | list[str] | None,
        exclude: str | list[str] | None,
        head: Union[str, HeadFactory],
        init: Literal["default", "downstream"],
    ) -> None:
        """Describes the downstream and builds the norm, head, gains and init buffers."""
        if not isinstance(downstream, nn.Module):
            raise TypeError(f"downstream must be a torch.nn.Module, got {type(downstream).__name__}")
        if init not in ("default", "downstream"):
            raise ValueError(f"init must be 'default' or 'downstream', got {init!r}")
        lazy = _lazy_names(downstream)
        if lazy:
            raise ValueError(
                f"the downstream has uninitialized lazy parameters {lazy}: run one forward "
                "pass of the downstream on an example input before building the hypernetwork"
            )
        all_names = [n for n, _ in downstream.named_parameters()]
        if not all_names:
            raise ValueError(f"the downstream {type(downstream).__name__} has no parameters to generate")
        names = _select(all_names, include, exclude)
        specs = _describe(downstream, names)

        self.init = init
        self.names = names
        self.shapes = [s.shape for s in specs]
        self.numels = [s.numel for s in specs]
        self.numel = sum(self.numels)

        # Gives the head an embedding of zero mean and unit variance, whatever the input scale.
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False)
        self.head = _make_head(head, in_features, self.shapes)

        gain = [0.0 if s.constant or init == "downstream" else 1.0 for s in specs]
        self.gain = nn.Parameter(torch.tensor(gain))
        self.register_buffer("scale", torch.tensor([s.scale for s in specs]))
        self.register_buffer("offset", torch.tensor([s.offset for s in specs]))
        self.register_buffer("counts", torch.tensor(self.numels, dtype=torch.long))
        base = None
        if init == "downstream":
            params = dict(downstream.named_parameters())
            base = torch.cat([params[n].detach().float().flatten().cpu() for n in names])
        self.register_buffer("base", base)

    def generate(self, z: Tensor) -> dict[str, Tensor]:
        r"""Maps embeddings ``(*, H)`` to parameters of shape ``(*, *shape)`` each.

        Args:
            z: Embeddings, ``(*, H)``; ``*`` may be empty (one parameter set) or a batch.

        Returns:
            The generated parameters, keyed and ordered like ``downstream.named_parameters()``.
        """
        z = self.norm(z)
        batch = z.shape[:-1]
        coef = self.scale * self.gain
        offsets = self.offset.unbind() if self.base is None else self.base.split(self.numels)
        if isinstance(self.head, Head):
            values = self.head.assemble(z, coef, offsets)
        else:  # any module a head factory returned: (*, H) -> (*, N)
            values = _assemble(self.head(z), coef, offsets, self.numels)
        return {
            name: v.view(batch + shape) for name, v, shape in zip(self.names, values, self.shapes)
        }

    def _generated_repr(self) -> str:
        own = sum(p.numel() for p in self.parameters())
        return (
            f"generated={len(self.names)} tensors ({self.numel} values), "
            f"parameters={own} ({own / self.numel:.3g}x generated), init={self.init!r}"
        )
