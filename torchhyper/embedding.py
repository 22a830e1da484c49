r"""Embedding-conditioned hypernetworks: integer ids (tasks, data sets, classes) to parameters.

Each id has a learned embedding; the same head and init as :class:`~torchhyper.HyperNetwork`
map it to a full set of downstream parameters. This is the task-conditioned hypernetwork of
von Oswald et al. 2020: one downstream per task from one set of hypernetwork weights. For
continual learning, :func:`output_regularizer` keeps the parameters generated for earlier tasks
close to what they were when those tasks were learned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Union, cast

import torch
from torch import Tensor, nn

from torchhyper._checks import activation as _activation
from torchhyper._checks import positive_int, positive_ints
from torchhyper._generator import _Generator, _mlp
from torchhyper._spec import _what_to_generate
from torchhyper.heads import HeadFactory

__all__ = ["EmbeddingHyperNetwork", "output_regularizer"]


class EmbeddingHyperNetwork(_Generator):
    r"""Generates the parameters of ``downstream`` for integer ids, one learned embedding each.

    ``forward(ids)`` embeds the ids with an ``nn.Embedding(num_embeddings, embedding_dim)``,
    passes them through an optional MLP with ``hidden_sizes``, and then through the same
    normalization and heads as :class:`~torchhyper.HyperNetwork`, with the same defaults: a
    learned base (the downstream's values, trained) plus an update from the id's embedding minus
    the running mean of the embeddings, by the ``"auto"`` head. The base holds what every id
    shares and the update what sets one id apart, as in multi-task training. With ids learned
    one after another (continual learning), keep the earlier ids' outputs with
    :func:`output_regularizer`, which covers the base as well. ``base="none"`` generates every
    tensor from the id alone, as in von Oswald et al. 2020.

    Dtypes, the state dict and the checks at each call follow
    :class:`~torchhyper.HyperNetwork`.

    Args:
        num_embeddings: How many ids: valid ids are ``0 .. num_embeddings - 1``.
        embedding_dim: Width of each id's learned embedding.
        downstream: The module whose parameters are generated. It is not registered.
        hidden_sizes: Widths of an MLP between the embedding and the head; default none.
        include: Glob pattern(s) of parameter names to generate. Default: all.
        exclude: Glob pattern(s) of parameter names not to generate.
        head: As for :class:`~torchhyper.HyperNetwork`: ``"auto"``, a name of
            :data:`torchhyper.heads.HEADS`, or a callable ``(in_features, shapes) -> module``.
        base: ``"learned"`` (the default), ``"frozen"`` or ``"none"``, as for
            :class:`~torchhyper.HyperNetwork`.
        activation: The MLP's activation: an ``nn.Module`` class such as ``nn.ReLU`` (not an
            instance or a name), or a factory that builds one with no arguments.

    Example:
        >>> downstream = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
        >>> hypernetwork = EmbeddingHyperNetwork(5, 8, downstream)
        >>> hypernetwork(2)["0.weight"].shape                   # task 2
        torch.Size([32, 1])
        >>> hypernetwork(torch.tensor([0, 3]))["0.weight"].shape  # tasks 0 and 3
        torch.Size([2, 32, 1])

    References:
        | Continual learning with hypernetworks (von Oswald et al., 2020)
        | https://arxiv.org/abs/1906.00695
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        downstream: nn.Module,
        *,
        hidden_sizes: Sequence[int] = (),
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        head: Union[str, HeadFactory] = "auto",
        base: Literal["learned", "frozen", "none"] = "learned",
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        # Every argument is checked before anything is built (or a random number drawn).
        self.num_embeddings = positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = positive_int("embedding_dim", embedding_dim)
        self.hidden_sizes = sizes = positive_ints("hidden_sizes", hidden_sizes, empty=True)
        _activation("activation", activation)
        generated = _what_to_generate(downstream, include=include, exclude=exclude, base=base)
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.encoder = _mlp(embedding_dim, sizes, activation)
        width = sizes[-1] if sizes else embedding_dim
        self._build(downstream, generated, width, head=head, base=base)

    def forward(self, ids: int | Tensor) -> dict[str, Tensor]:
        r"""Generates the parameters for ``ids``.

        Args:
            ids: One id (an ``int`` or a 0-dim tensor) or integer ids of shape ``(*)``.

        Returns:
            Parameters of shape ``(*, *shape)``, keyed like ``downstream.named_parameters()``.
        """
        return self.generate(self.embed(ids))

    def embed(self, ids: int | Tensor) -> Tensor:
        r"""The embeddings ``(*, H)`` of integer ids ``(*)``, after the optional MLP."""
        z: Tensor = self.encoder(self.embedding(self._check_ids(ids)))
        return z

    def _check_ids(self, ids: int | Tensor) -> Tensor:
        device = self.embedding.weight.device
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = torch.tensor(ids, device=device)
        if (
            not isinstance(ids, Tensor)
            or ids.is_floating_point()
            or ids.is_complex()
            or ids.dtype == torch.bool
        ):
            shown = f"dtype {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise TypeError(f"ids must be an int or an integer tensor, got {shown}")
        if ids.device != device:
            raise ValueError(
                f"ids are on device {ids.device} but the hypernetwork is on {device}: "
                f"move them, e.g. ids.to('{device}')"
            )
        if ids.numel() and ids.device.type != "meta":
            low, high = ids.min().item(), ids.max().item()
            if low < 0 or high >= self.num_embeddings:
                raise ValueError(
                    f"ids must be in [0, {self.num_embeddings - 1}] (num_embeddings="
                    f"{self.num_embeddings}), got values from {low} to {high}"
                )
        return ids

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"{self._generated_repr()}"
        )


def output_regularizer(params: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    r"""The output regularizer of von Oswald et al. 2020, for continual learning.

    ``mean_t sum_name ||params[name][t] - targets[name][t]||^2`` over ``T`` earlier tasks:
    the squared distance between what the hypernetwork generates for each earlier task now and
    what it generated when that task was learned (``targets``, detached). Add
    ``beta * output_regularizer(...)`` to the current task's loss. (The paper's optional
    look-ahead term is left out.)

    Args:
        params: The parameters generated now for earlier task ids, each ``(T, *shape)``.
        targets: The parameters stored for the same ids, with the keys (in any order) and
            shapes of ``params``.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: Keys or shapes of ``params`` and ``targets`` differ.

    Example:
        >>> hypernetwork = EmbeddingHyperNetwork(5, 8, nn.Linear(1, 1))
        >>> old = torch.arange(2)               # after learning tasks 0 and 1
        >>> targets = {k: v.detach() for k, v in hypernetwork(old).items()}
        >>> # ... then, while learning task 2 (task_loss: its own loss; beta: e.g. 0.01):
        >>> output_regularizer(hypernetwork(old), targets)  # 0 until the weights move
        tensor(0., grad_fn=<DivBackward0>)
        >>> # loss = task_loss + beta * output_regularizer(hypernetwork(old), targets)

    References:
        | Continual learning with hypernetworks (von Oswald et al., 2020)
        | https://arxiv.org/abs/1906.00695
    """
    if params.keys() != targets.keys():  # the same keys, in any order
        missing = [k for k in params if k not in targets]
        unexpected = [k for k in targets if k not in params]
        raise ValueError(
            f"params and targets must have the same keys: missing from targets {missing}, "
            f"not in params {unexpected}"
        )
    wrong = [
        f"{k}: {tuple(params[k].shape)} vs {tuple(v.shape)}"
        for k, v in targets.items()
        if v.shape != params[k].shape
    ]
    if wrong:
        raise ValueError("params and targets must have the same shapes: " + "; ".join(wrong))
    first = next(iter(params.values()))
    tasks = first.shape[0] if first.dim() else 1
    total = sum((p - targets[k].detach()).square().sum() for k, p in params.items())
    return cast(Tensor, total) / tasks
