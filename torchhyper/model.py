r"""The hypernetwork: a module that generates the parameters of any downstream ``nn.Module``.

The generated parameters come as a plain dict keyed and ordered like
``downstream.named_parameters()``, which is exactly what :func:`torch.func.functional_call` takes.

Three ways to condition, one encoder and head:

* :meth:`HyperNetwork.forward`: one parameter set from a whole set ``(B, *)``;
* :meth:`HyperNetwork.per_set`: one parameter set per set, from a batch of sets ``(S, B, *)``;
* :meth:`HyperNetwork.per_sample`: one parameter set per example, ``(B, *shape)`` each, to apply
  with :func:`torchhyper.per_sample_call`.

What the hypernetwork reads need not be what the downstream reads: condition on a context ``c``
(``params = hypernetwork(c)``) and run the downstream on other inputs
(``functional_call(downstream, params, x)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, Union

import torch
from torch import Tensor, nn

from torchhyper._checks import activation as _activation
from torchhyper._checks import module, output_shape, positive_int, positive_ints
from torchhyper._generator import _Generator, _mlp
from torchhyper._spec import _what_to_generate
from torchhyper.heads import HeadFactory
from torchhyper.pooling import Pool, _make_pool

# Added to a set's standard deviation: a constant feature stays finite (a set of one reads 0).
_EPS = 1e-5

__all__ = ["HyperNetwork"]


class HyperNetwork(_Generator):
    r"""Generates the parameters of ``downstream`` from a batch of inputs.

    By default the hypernetwork is conditioned on a whole set: an MLP with
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
    of a pretrained downstream, as in Text-to-LoRA or HyperDreamBooth); ``base="none"`` generates
    every value from the embedding (full generation, below).

    Learning dynamics. Under Adam, a base moves each weight by about ``lr`` per step, exactly as
    training the downstream directly does. The update reads ``z - center``, where ``center`` is a
    running mean of the (normalized) embeddings over training calls, so it carries only what
    distinguishes one input from the average: the part every input shares is the base's alone,
    learned at direct training's pace, and an uninformative conditioning adds almost nothing.
    ``center`` is a buffer, updated in training mode only, like BatchNorm's running mean. The
    default head (``"auto"``) is a dense map from ``z - center`` to every value while it fits a
    budget of :data:`~torchhyper.heads.AUTO_BUDGET` parameters; above it, dense maps for the
    smallest tensors and, for the others, a scale per row plus a low-rank additive term where
    scaling cannot move a tensor (:class:`~torchhyper.heads.HybridHead`). Its outputs start at
    exactly zero with full-size gradients, so the conditioned part moves from the first step, and a
    base of zeros (PEFT's ``lora_B``), frozen or learned, moves too. To train the base at another
    rate than the rest, give ``hypernetwork.base`` (its tensors; ``None`` with ``base="none"``) its
    own optimizer parameter group.

    Full generation (``base="none"``). Each generated tensor is ``offset + spread * gain * h``,
    with ``h`` the head's raw values of unit variance at init. ``offset`` and ``spread`` are the
    mean and std of the tensor under the downstream's own init, measured at construction (see
    ``torchhyper._init_stats``), so that generated weights start at the scale that init gives them,
    layer by layer (the goal of hyperfan init, Chang et al. 2020). The learned per-tensor
    ``gain`` separates each tensor's magnitude from the head, as in the magnitude-invariant
    parametrizations of Ortiz et al. 2023. Tensors set to constants (norm scales, zero
    shifts) start with a ``gain`` of 0, so exactly at their constants. Adam's steps in ``h``
    then move a weight by about ``spread * lr``: slower than direct training for a bias, faster
    for a dense head's shared part.

    Dtypes. Each tensor is generated in its downstream tensor's dtype; the hypernetwork
    computes in float32 for a float16/bfloat16 downstream and in float64 for a float64 one
    (built in float64; an ``encoder`` or pool you pass is converted with it). Convert the
    downstream before building. Complex, integer and meta parameters and ScriptModules are
    refused. The state dict records the generated names and shapes; ``load_state_dict`` checks
    them, and every key and shape, before it writes anything.

    Checks at each call. The downstream it was built on is compared with what it held at
    construction: a layer added or replaced, a conversion to another dtype, or buffers on
    another device than the hypernetwork raise a ``ValueError`` that names the tensors (change
    the downstream first, then build). Values loaded into the downstream later are not read:
    :meth:`rebase_` takes them as the base. In training mode, embeddings with a non-finite
    value are left out of the running mean, with a warning, so no buffer holds one and no other
    row is spoiled. The update starts at exactly zero: at init the generated weights do not
    depend on the input, and a loss's gradient with respect to the input is zero until the
    first optimizer step. ``docs/guides/pitfalls.md`` has the details.

    Set encoding. Each example is encoded on its own (by the MLP of ``hidden_sizes``, or by your
    ``encoder`` followed by that MLP), then the pool reduces the set. Two options help when the
    fit needs the set's scale as well as its location (amortized fits of distributions):

    * ``standardize=True`` standardizes each set's inputs, feature by feature, by the set's own
      mean and standard deviation before the encoder, and appends that mean and log standard
      deviation to the pooled embedding (``H + 2 * input_dim`` features), as statistics
      networks do (Edwards and Storkey 2017). Exact first and second moments reach the head,
      whatever the encoder resolves: they skip the head's layer norm, and with ``rho`` they
      are appended to its output as well as read by it, so a fit that is affine in them
      (a Gaussian's log standard deviation) is exactly linear in the head's input, inside the
      training range and beyond it.
    * ``pool="moments"`` (:class:`~torchhyper.pooling.MomentsPool`) pools the mean and the
      standard deviation of the encodings; ``AttentionPool(H, seeds=k)`` attends with ``k``
      seed queries (PMA with several seeds, Lee et al. 2019).

    Args:
        input_dim: Features per example, ``x[0].numel()``; or, with ``encoder``, the shape of
            one example, e.g. ``(1, 8, 8)`` for images.
        hidden_sizes: Widths of the per-example encoder MLP, e.g. ``[32, 64, 96]``. With
            ``encoder``, the widths of an MLP after it; ``[]`` for none.
        downstream: The module whose parameters are generated.
        include: Glob pattern(s) of parameter names to generate; others keep the module's
            own values, which the hypernetwork does not train (to share and train them, give
            them to your optimizer with ``requires_grad=True``). Default: all.
        exclude: Glob pattern(s) of parameter names not to generate.
        head: ``"auto"`` (chosen by cost: dense while ``(H + 1) N`` fits
            :data:`~torchhyper.heads.AUTO_BUDGET` parameters, else
            :class:`~torchhyper.heads.HybridHead`, or with ``base="none"`` a
            :class:`~torchhyper.heads.LoRAHead`; see :func:`~torchhyper.heads.auto_head`), another
            name of :data:`torchhyper.heads.HEADS`, or a callable ``(in_features, shapes) ->
            module``.
        base: ``"learned"`` (a trained copy of the downstream's values, plus the head's
            update), ``"frozen"`` (a fixed copy, plus the update) or ``"none"`` (the head
            generates every value, at the statistics of the downstream's own init).
        pool: How the per-example encodings ``(B, H)`` become one ``(H,)``: a name of
            :data:`torchhyper.pooling.POOLS` (``"mean"``, the default, ``"sum"``, ``"max"``,
            ``"attention"``), a :class:`~torchhyper.pooling.Pool`, or a callable
            ``(B, H) -> (H,)`` (an ``nn.Module`` is registered and trained). See
            :mod:`torchhyper.pooling`.
        activation: The encoder's activation: an ``nn.Module`` class such as ``nn.ReLU`` (not
            an instance or a name), or a factory that builds one with no arguments.
        encoder: Any module that maps examples ``(N, *example)`` to encodings ``(N, E)``, in
            place of the MLP's input: a small CNN over images, a frozen text encoder's
            projection. It is registered (so trained, unless you freeze it); its output shape is
            checked on a dummy input at construction. Pooling, heads and the per-set and
            per-sample modes work as with the MLP.
        rho: Widths of an MLP after the pool (and the appended statistics), before the head:
            Deep Sets' rho (Zaheer et al. 2017), for fits that are nonlinear in the pooled
            statistics. Default: none.
        standardize: Standardize each set by its own statistics, and append them to the
            embedding (above). For a set of one (``per_sample``) the standard deviation is 0:
            the encoder reads zeros and the embedding holds the example itself.

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
        input_dim: int | Sequence[int],
        hidden_sizes: Sequence[int],
        downstream: nn.Module,
        *,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        head: Union[str, HeadFactory] = "auto",
        base: Literal["learned", "frozen", "none"] = "learned",
        pool: Union[str, Pool, Callable[[Tensor], Tensor]] = "mean",
        activation: type[nn.Module] = nn.ReLU,
        encoder: nn.Module | None = None,
        standardize: bool = False,
        rho: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if isinstance(input_dim, (list, tuple)):
            self.input_shape = tuple(positive_ints("input_dim", input_dim))
        else:
            self.input_shape = (positive_int("input_dim", input_dim),)
        self.input_dim = math.prod(self.input_shape)
        self.hidden_sizes = sizes = positive_ints(
            "hidden_sizes", hidden_sizes, empty=encoder is not None
        )
        _activation("activation", activation)
        generated = _what_to_generate(downstream, include=include, exclude=exclude, base=base)
        if not isinstance(standardize, bool):
            raise TypeError(f"standardize must be a bool, got {type(standardize).__name__}")
        self.standardize = standardize
        if encoder is None:
            self.input_shape = (self.input_dim,)  # the MLP reads each example flattened
            self.encoder: nn.Module = _mlp(self.input_dim, sizes, activation)
        else:
            width = _encoder_width(module("encoder", encoder), self.input_shape)
            self.encoder = nn.Sequential(encoder, _mlp(width, sizes, activation))
        width = sizes[-1] if sizes else width
        self.pool = _make_pool(pool, width)
        if standardize and type(self.pool).local is not Pool.local:
            raise ValueError(
                "standardize=True takes the statistics of the set this process holds, so it "
                f"cannot be combined with {type(self.pool).__name__}, a pool over several "
                "processes"
            )
        stats = 2 * self.input_dim if standardize else 0
        self.rho_sizes = positive_ints("rho", rho, empty=True)
        self.rho = _mlp(width + stats, self.rho_sizes, activation)
        if self.rho_sizes:
            width = self.rho_sizes[-1]
        # The statistics of standardize reach the head unnormalized, after rho too.
        norm = _PartNorm(width) if standardize else None
        self._build(downstream, generated, width + stats, head=head, base=base, norm=norm)

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
        return self._embed(x, sets=0)

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
        return self.generate(self._embed(x, sets=1))

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
            >>> from torchhyper import per_sample_call
            >>> downstream = nn.Linear(3, 2)
            >>> hypernetwork = HyperNetwork(5, [16], downstream)
            >>> c, x = torch.randn(8, 5), torch.randn(8, 3)   # a context and an input each
            >>> params = hypernetwork.per_sample(c)
            >>> per_sample_call(downstream, params, x).shape  # y[i] = downstream_i(x[i])
            torch.Size([8, 2])
        """
        self._check_input(x, sets=False)
        # Each example is its own set of one, held by this process alone.
        return self.generate(self._embed(x.unsqueeze(1), sets=1, local=True))

    def _embed(self, x: Tensor, *, sets: int, local: bool = False) -> Tensor:
        """Embeddings ``(*, H)`` of sets ``x`` of shape ``(*, B, *example)``, ``sets = len(*)``."""
        batch = x.shape[: sets + 1]  # (*, B)
        flat = x.reshape(*batch, -1)
        if self.standardize:
            mean = flat.mean(dim=-2, keepdim=True)
            std = flat.std(dim=-2, correction=0, keepdim=True)
            flat = (flat - mean) / (std + _EPS)
        e = self.encoder(flat.reshape(-1, *self.input_shape))
        e = e.reshape(*batch, e.shape[-1])
        z: Tensor = self.pool.local(e) if local else self.pool(e)
        if not self.standardize:
            out: Tensor = self.rho(z)
            return out
        stats = torch.cat([mean.squeeze(-2), (std + _EPS).log().squeeze(-2)], dim=-1)
        z = torch.cat([z, stats], dim=-1)
        return torch.cat([self.rho(z), stats], dim=-1) if self.rho_sizes else z

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
        if len(self.input_shape) > 1 and x.shape[lead:] != self.input_shape:
            raise ValueError(
                f"x must have shape {'(S, B, *)' if sets else '(B, *)'} with * == input_dim == "
                f"{self.input_shape} (the encoder's example shape), got shape {tuple(x.shape)}"
            )
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


class _PartNorm(nn.LayerNorm):
    """A LayerNorm over the first ``width`` features; the rest pass unchanged."""

    def __init__(self, width: int) -> None:
        super().__init__(width, elementwise_affine=False)
        self.width = width

    def forward(self, z: Tensor) -> Tensor:
        head, rest = z[..., : self.width], z[..., self.width :]
        return torch.cat([super().forward(head), rest], dim=-1)


def _encoder_width(encoder: nn.Module, shape: tuple[int, ...]) -> int:
    """The width ``E`` of ``encoder``'s encodings ``(N, E)``, from one call on 2 dummy examples."""
    ref = next(encoder.parameters(), None)
    dummy = torch.zeros(2, *shape)
    if ref is not None:
        dummy = dummy.to(ref.device, ref.dtype if ref.is_floating_point() else None)
    what = f"encoder must map examples (N, *{shape}) to encodings (N, E)"
    return output_shape(encoder, dummy, (2, None), what)[1]
