r"""The hypernetwork: a module that generates the parameters of any downstream ``nn.Module``.

The generated parameters come as a plain dict keyed and ordered like
``downstream.named_parameters()``, which is exactly what :func:`torch.func.functional_call` takes.

Three ways to condition, one encoder and head:

* :meth:`HyperNetwork.forward` (the seed's): one parameter set from a whole set ``(B, *)``;
* :meth:`HyperNetwork.per_set`: one parameter set per set, from a batch of sets ``(S, B, *)``;
* :meth:`HyperNetwork.per_sample`: one parameter set per example, ``(B, *shape)`` each, to apply
  with :func:`torchhyper.per_sample_call`.

What the hypernetwork reads need not be what the downstream reads: condition on a context ``c``
(``params = hypernetwork(c)``) and run the downstream on other inputs
(``functional_call(downstream, params, x)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Union

from torch import Tensor, nn

from torchhyper._generator import _Generator
from torchhyper.heads import HeadFactory
from torchhyper.pooling import POOLS, Pool, _make_pool, _pool_sets

__all__ = ["HyperNetwork"]


class HyperNetwork(_Generator):
    r"""Generates the parameters of ``downstream`` from a batch of inputs.

    By default the hypernetwork is set-conditioned, like the original torchhyper: an MLP with
    ``hidden_sizes`` encodes each example of ``x``, the encodings are pooled over the batch
    (averaged by default), and a head maps the result to one value per generated parameter entry.
    :meth:`per_sample` skips the pooling and returns one parameter set per example instead.

    The downstream is not registered as a submodule: its tensors are in neither
    :meth:`parameters` nor :meth:`state_dict`, and it is never modified. Its buffers (e.g.
    BatchNorm running statistics) are not generated; they stay with the module, and
    ``functional_call`` uses (and, in train mode, updates) the module's own.

    Base and update. By default (``base="learned"``) each generated tensor is the downstream's
    own tensor, copied at construction into a trained parameter in weight units (its *base*),
    plus a conditioned update from the head that is exactly zero at init:
    ``theta_i(x) = base_i + update_i(z - center)``. So the hypernetwork starts at the
    downstream's current values, whatever library initialized them (PyTorch, transformers'
    ``_init_weights``, PEFT's zero ``lora_B``). ``base="frozen"`` keeps the base fixed (adapters
    of a pretrained downstream, as in Text-to-LoRA or HyperDreamBooth); ``base="none"`` is the
    original torchhyper's full generation (below).

    Learning dynamics. Under Adam, a base moves each weight by about ``lr`` per step, exactly as
    training the downstream directly does. The update reads ``z - center``, where ``center``
    is a running mean of the (normalized) embeddings over training calls, so it carries only what
    distinguishes one input from the average: the part every input shares is the base's alone,
    learned at direct training's pace, and an uninformative conditioning adds almost nothing.
    The heads' outputs start at zero but have full-size gradients (no gain that starts at 0),
    so the conditioned part moves at a dense head's pace: :class:`~torchhyper.heads.FiLMHead`
    scales each row of a base by ``1 + g(z - center)``. ``center`` is a buffer, updated in
    training mode only, like BatchNorm's running mean. To train the base at another rate than
    the rest (the rate you would train the downstream at), give ``hypernetwork.bases`` its own
    optimizer parameter group.

    Full generation (``base="none"``). Each generated tensor is ``offset + scale * gain * h``,
    with ``h`` the head's raw values of unit variance at init. ``offset`` and ``scale`` are the
    mean and std of the tensor under PyTorch's default init of the downstream, measured at
    construction, so that generated weights start at the scale the downstream's own init gives
    them, layer by layer (the goal of hyperfan init, Chang et al. 2020). The learned per-tensor
    ``gain`` separates each tensor's magnitude from the head, as in the magnitude-invariant
    parametrizations of Ortiz et al. 2023. Tensors PyTorch sets to constants (norm scales, zero
    shifts) start with a ``gain`` of 0, so exactly at their constants. Adam's steps in ``h``
    then move a weight by about ``scale * lr``: slower than direct training for a bias, faster
    for a dense head's shared part; measured in ``benchmarks/quality.py``.

    Args:
        input_dim: Features per example, ``x[0].numel()``.
        hidden_sizes: Widths of the per-example encoder MLP, e.g. ``[32, 64, 96]``.
        downstream: The module whose parameters are generated.
        include: Glob pattern(s) of parameter names to generate; others keep the module's
            own values. Default: all.
        exclude: Glob pattern(s) of parameter names not to generate.
        head: ``"auto"`` (dense for at most 4096 generated values, else
            :class:`~torchhyper.heads.FiLMHead`, or with ``base="none"`` a
            :class:`~torchhyper.heads.LoRAHead`; see :func:`~torchhyper.heads.auto_head`),
            another name of :data:`torchhyper.heads.HEADS`, or a callable
            ``(in_features, shapes) -> module``.
        base: ``"learned"`` (a trained copy of the downstream's values, plus the head's
            update), ``"frozen"`` (a fixed copy, plus the update) or ``"none"`` (the head
            generates every value, at the statistics of PyTorch's default init).
        init: Kept for compatibility, and follows ``base``: ``"downstream"`` with a base,
            ``"default"`` with ``base="none"``; any other pairing is an error.
        pool: How the per-example encodings ``(B, H)`` become one ``(H,)``: ``"mean"`` (the
            original's), ``"sum"``, ``"max"``, ``"attention"`` (a trained
            :class:`~torchhyper.pooling.AttentionPool`), or a callable (e.g. an ``nn.Module``,
            which is registered and trained). See :mod:`torchhyper.pooling`.
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
        base: Literal["learned", "frozen", "none"] = "learned",
        init: Literal["default", "downstream"] | None = None,
        pool: Union[Literal["mean", "sum", "max", "attention"], Pool] = "mean",
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
        sizes = list(hidden_sizes) if isinstance(hidden_sizes, (list, tuple)) else None
        if not sizes or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in sizes
        ):
            raise ValueError(
                f"hidden_sizes must be a non-empty list of positive ints, got {hidden_sizes!r}"
            )
        if not isinstance(downstream, nn.Module):
            raise TypeError(
                f"downstream must be a torch.nn.Module, got {type(downstream).__name__}"
            )
        self.input_dim = input_dim
        self.hidden_sizes = sizes

        layers: list[nn.Module] = []
        for n_in, n_out in zip([input_dim, *sizes[:-1]], sizes):
            layers += [nn.Linear(n_in, n_out), activation()]
        self.encoder = nn.Sequential(*layers)
        self.pool = _make_pool(pool, sizes[-1])
        self._build(
            downstream, sizes[-1], include=include, exclude=exclude, head=head, init=init, base=base
        )

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
        self._check_input(x, sets=False)
        return self.pool(self.encoder(x.reshape(x.shape[0], -1)))

    def per_set(self, x: Tensor) -> dict[str, Tensor]:
        r"""Generates one parameter set per set, from a batch of ``S`` sets of ``B`` examples.

        ``per_set(x)[name][s]`` equals ``forward(x[s])[name]``, computed in one pass (in eval
        mode; in training mode the running mean of the embeddings takes in all ``S`` at once).

        Args:
            x: Sets of examples, ``(S, B, *)`` with ``prod(*) == input_dim``.

        Returns:
            Parameters of shape ``(S, *shape)``, keyed like ``downstream.named_parameters()``.
        """
        self._check_input(x, sets=True)
        e = self.encoder(x.reshape(x.shape[0], x.shape[1], -1))
        return self.generate(_pool_sets(self.pool, e))

    def per_sample(self, x: Tensor) -> dict[str, Tensor]:
        r"""Generates one parameter set per example: each example is its own set of one.

        ``per_sample(x)[name][i]`` equals ``forward(x[i:i + 1])[name]`` (in eval mode, as for
        :meth:`per_set`). Apply the result to
        the downstream in one call with :func:`torchhyper.per_sample_call`.

        Args:
            x: Examples, ``(B, *)`` with ``prod(*) == input_dim``.

        Returns:
            Parameters of shape ``(B, *shape)``, keyed like ``downstream.named_parameters()``.

        Example:
            >>> params = hypernetwork.per_sample(c)            # c: (B, input_dim)
            >>> y = per_sample_call(downstream, params, x)     # y[i] = downstream_i(x[i])
        """
        self._check_input(x, sets=False)
        e = self.encoder(x.reshape(x.shape[0], -1))
        # Each example is its own set, held by one process: a pool that reduces across
        # processes (torchhyper.distributed) offers its single-process form as `.local`.
        pool = getattr(self.pool, "local", self.pool)
        if pool in POOLS.values():
            z = e  # a mean, sum or max over one example is that example
        else:
            z = _pool_sets(pool, e.unsqueeze(1))
        return self.generate(z)

    def _check_input(self, x: Tensor, *, sets: bool) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        lead = 2 if sets else 1
        form = "(S, B, *) with S, B >= 1" if sets else "(B, *) with B >= 1"
        if x.dim() < lead or 0 in x.shape[:lead]:
            what = "a non-empty batch of sets" if sets else "a non-empty batch"
            raise ValueError(f"x must be {what} {form}, got shape {tuple(x.shape)}")
        features = math.prod(x.shape[lead:])
        if features != self.input_dim:
            shape = "(S, B, *)" if sets else "(B, *)"
            raise ValueError(
                f"x must have shape {shape} with prod(*) == input_dim == {self.input_dim}, "
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
        return f"input_dim={self.input_dim}, {self._generated_repr()}"
