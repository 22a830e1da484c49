r"""The hypernetwork: a module that generates the parameters of any downstream ``nn.Module``.

The generated parameters come as a plain dict keyed and ordered like
``downstream.named_parameters()``, which is exactly what :func:`torch.func.functional_call` takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, Union

import torch
from torch import Tensor, nn

from torchhyper._spec import _describe, _lazy_names, _select
from torchhyper.heads import HeadFactory, _make_head

__all__ = ["HyperNetwork"]


def _mean(e: Tensor) -> Tensor:
    return e.mean(dim=0)


def _sum(e: Tensor) -> Tensor:
    return e.sum(dim=0)


def _max(e: Tensor) -> Tensor:
    return e.amax(dim=0)


_POOLS: dict[str, Callable[[Tensor], Tensor]] = {"mean": _mean, "sum": _sum, "max": _max}


class HyperNetwork(nn.Module):
    r"""Generates the parameters of ``downstream`` from a batch of inputs.

    By default the hypernetwork is set-conditioned, like the original torchhyper: an MLP with
    ``hidden_sizes`` encodes each example of ``x``, the encodings are averaged over the batch, and
    a head maps the result to one value per generated parameter entry.

    The downstream is not registered as a submodule: its tensors are in neither
    :meth:`parameters` nor :meth:`state_dict`, and it is never modified. Its buffers (e.g.
    BatchNorm running statistics) are not generated; they stay with the module, and
    ``functional_call`` uses (and, in train mode, updates) the module's own.

    Init. Each generated tensor is ``offset + scale * gain * h``, with ``h`` the head's raw
    values of unit variance at init. ``offset`` and ``scale`` are the mean and std of the
    tensor under PyTorch's default init of the downstream, measured at construction, so that
    generated weights start at the scale the downstream's own init gives them, layer by layer
    (the goal of hyperfan init, Chang et al. 2020). The learned per-tensor ``gain`` separates
    each tensor's magnitude from the head, as in the magnitude-invariant parametrizations of
    Ortiz et al. 2023. Tensors PyTorch sets to constants (norm scales, zero shifts) start with a
    ``gain`` of 0, so exactly at their constants. With ``init="downstream"``, every tensor is
    ``theta_0 + scale * gain * h`` with ``theta_0`` the downstream's current values and
    ``gain = 0``: the hypernetwork starts exactly at a (pretrained) downstream.

    Args:
        input_dim: Features per example, ``x[0].numel()``.
        hidden_sizes: Widths of the per-example encoder MLP, e.g. ``[32, 64, 96]``.
        downstream: The module whose parameters are generated.
        include: Glob pattern(s) of parameter names to generate; others keep the module's
            own values. Default: all.
        exclude: Glob pattern(s) of parameter names not to generate.
        head: ``"auto"`` (dense for small downstreams, else chunked), ``"dense"``,
            ``"chunked"``, ``"lowrank"``, or a callable ``(in_features, shapes) -> Head``.
        init: ``"default"`` starts at the scale of PyTorch's default init; ``"downstream"``
            starts exactly at the downstream's current values.
        pool: How the per-example encodings ``(B, H)`` become one ``(H,)``: ``"mean"`` (the
            original's), ``"sum"``, ``"max"``, or a callable (e.g. an ``nn.Module``, which is
            registered and trained).
        activation: The encoder's activation module class.

    Example:
        >>> downstream = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> hypernetwork = HyperNetwork(4, [32, 64], downstream)
        >>> x = torch.randn(8, 4)
        >>> params = hypernetwork(x)
        >>> list(params) == [name for name, _ in downstream.named_parameters()]
        True
        >>> torch.func.functional_call(downstream, params, x).shape
        torch.Size([8, 4])

    References:
        | Principled Weight Initialization for Hypernetworks (Chang et al., 2020)
        | https://openreview.net/forum?id=H1lma24tPB
        | Magnitude Invariant Parametrizations Improve Hypernetwork Learning (Ortiz et al., 2023)
        | https://arxiv.org/abs/2304.07645
    """

    def __init__(
        self,
        input_dim: int,
        hidden_sizes: Sequence[int],
        downstream: nn.Module,
        *,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        head: Union[str, HeadFactory] = "auto",
        init: Literal["default", "downstream"] = "default",
        pool: Union[Literal["mean", "sum", "max"], Callable[[Tensor], Tensor]] = "mean",
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
        sizes = list(hidden_sizes) if isinstance(hidden_sizes, (list, tuple)) else None
        if not sizes or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in sizes):
            raise ValueError(
                f"hidden_sizes must be a non-empty list of positive ints, got {hidden_sizes!r}"
            )
        if not isinstance(downstream, nn.Module):
            raise TypeError(f"downstream must be a torch.nn.Module, got {type(downstream).__name__}")
        if isinstance(pool, str) and pool not in _POOLS:
            raise ValueError(f"pool must be one of {sorted(_POOLS)} or a callable, got {pool!r}")
        if not isinstance(pool, str) and not callable(pool):
            raise TypeError(f"pool must be a name or a callable (B, H) -> (H,), got {pool!r}")
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

        self.input_dim = input_dim
        self.hidden_sizes = sizes
        self.init = init
        self.names = names
        self.shapes = [s.shape for s in specs]
        self.numels = [s.numel for s in specs]
        self.numel = sum(self.numels)

        layers: list[nn.Module] = []
        for n_in, n_out in zip([input_dim, *sizes[:-1]], sizes):
            layers += [nn.Linear(n_in, n_out), activation()]
        self.encoder = nn.Sequential(*layers)
        # Gives the head an embedding of zero mean and unit variance, whatever the input scale.
        self.pool = _POOLS[pool] if isinstance(pool, str) else pool
        self.norm = nn.LayerNorm(sizes[-1], elementwise_affine=False)
        self.head = _make_head(head, sizes[-1], self.shapes)

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

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        r"""Generates one set of downstream parameters from the set ``x``.

        Args:
            x: A batch of examples, ``(B, *)`` with ``prod(*) == input_dim``.

        Returns:
            The generated parameters, keyed and ordered like ``downstream.named_parameters()``.
        """
        return self.generate(self.embed(x))

    def embed(self, x: Tensor) -> Tensor:
        r"""Encodes the set ``x`` of shape ``(B, *)`` into one embedding of shape ``(H,)``."""
        self._check_input(x)
        return self.pool(self.encoder(x.reshape(x.shape[0], -1)))

    def generate(self, z: Tensor) -> dict[str, Tensor]:
        r"""Maps embeddings ``(*, H)`` to parameters of shape ``(*, *shape)`` each."""
        h = self.head(self.norm(z))
        batch = h.shape[:-1]
        coef = torch.repeat_interleave(self.scale * self.gain, self.counts, output_size=self.numel)
        if self.base is None:
            offset = torch.repeat_interleave(self.offset, self.counts, output_size=self.numel)
        else:
            offset = self.base
        values = torch.addcmul(offset, coef, h).split(self.numels, dim=-1)
        return {
            name: v.view(batch + shape) for name, v, shape in zip(self.names, values, self.shapes)
        }

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (B, *) with B >= 1, got shape {tuple(x.shape)}")
        features = math.prod(x.shape[1:])
        if features != self.input_dim:
            raise ValueError(
                f"x must have shape (B, *) with prod(*) == input_dim == {self.input_dim}, "
                f"got shape {tuple(x.shape)} ({features} features per example)"
            )
        ref = self.gain
        if x.dtype != ref.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the hypernetwork has dtype {ref.dtype}: "
                f"cast one of them, e.g. x.to({ref.dtype})"
            )
        if x.device != ref.device:
            raise ValueError(
                f"x is on device {x.device} but the hypernetwork is on {ref.device}: "
                f"move one of them, e.g. x.to('{ref.device}')"
            )

    def extra_repr(self) -> str:
        own = sum(p.numel() for p in self.parameters())
        return (
            f"input_dim={self.input_dim}, generated={len(self.names)} tensors "
            f"({self.numel} values), parameters={own} ({own / self.numel:.3g}x generated), "
            f"init={self.init!r}"
        )
