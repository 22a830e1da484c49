r"""What the trainer needs from an experiment, and helpers the experiments share.

A task owns its data, the downstream module (the template whose parameters are generated) and
its evaluation. The trainer (``experiments/train.py``) owns models, optimizers, the loop and
checkpoints, and talks to a task only through :class:`Task`'s members: ``downstream``,
``input_dim``, ``num_datasets``, ``sample``, ``loss`` and ``finish``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import torch
from matplotlib.axes import Axes
from torch import Tensor, nn

if TYPE_CHECKING:
    from experiments.config import Config

History = dict[str, list[float]]
r"""The training losses per step: ``{"hypernetwork": [...], "direct": [...]}``."""

__all__ = [
    "History",
    "Task",
    "describe",
    "fit_direct",
    "lr_factor",
    "mean_loss",
    "plot_losses",
    "within",
]


class Task:
    r"""The interface of an experiment.

    Attributes:
        downstream: The module whose parameters are generated (and, copied, trained directly).
        input_dim: Features per example of a set, what the hypernetwork reads.
        example_shape: The shape of one example, where it is an image ``(C, H, W)`` (the
            examples come flattened, ``C * H * W == input_dim``); what ``encoder="cnn"`` needs.
            ``None``: the examples are plain vectors.
        num_datasets: How many fixed training datasets there are. The trainer trains one direct
            copy of the downstream per dataset, on the same sets the hypernetwork sees. 0 means
            an infinite family (fresh random datasets each step): the direct fits then happen
            at evaluation, on each held-out dataset.
    """

    downstream: nn.Module
    input_dim: int
    example_shape: tuple[int, ...] | None = None
    num_datasets: int

    def __init__(self, config: Config, device: torch.device) -> None:
        r"""Builds the data and the downstream (on ``device``) for ``config``; ``config.task`` is
        an instance of the experiment's config dataclass."""

    def sample(self, generator: torch.Generator) -> tuple[int, Tensor]:
        r"""One training set: ``(dataset index or -1, batch (B, *))``, drawn with ``generator``."""
        raise NotImplementedError

    def loss(self, params: dict[str, Tensor], batch: Tensor) -> Tensor:
        r"""The scalar training loss of the downstream with ``params`` on ``batch``."""
        raise NotImplementedError

    def evaluate(
        self,
        hypernetwork: nn.Module,
        direct: nn.ModuleList,
        history: dict[str, list[float]],
        out: Path,
    ) -> dict[str, Any]:
        r"""Evaluates both models, writes the plots into ``out`` and returns the metrics."""
        raise NotImplementedError

    def finish(
        self,
        hypernetwork: nn.Module,
        direct: nn.ModuleList,
        history: dict[str, list[float]],
        out: Path,
    ) -> dict[str, Any]:
        r"""What the trainer calls after training: :meth:`evaluate`, plus what was trained."""
        return {
            **self.evaluate(hypernetwork, direct, history, out),
            "hypernetwork_model": describe(hypernetwork),
        }


def fit_direct(
    downstream: nn.Module,
    loss: Callable[[dict[str, Tensor], Tensor], Tensor],
    data: Tensor,
    *,
    steps: int,
    lr: float,
) -> dict[str, Tensor]:
    r"""Fits the downstream's parameters to ``data`` (full batch) with Adam and cosine decay,
    from the downstream's own init; returns the fitted params, detached."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in downstream.named_parameters()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss(params, data).backward()
        optimizer.step()
        schedule.step()
    return {n: p.detach() for n, p in params.items()}


def describe(hypernetwork: nn.Module) -> dict[str, Any]:
    r"""What was trained: the head's class and the parameter counts, for ``metrics.json``."""
    module = getattr(hypernetwork, "module", hypernetwork)  # unwrap DDP
    head = getattr(module, "head", None)
    return {
        "head": type(head).__name__ if head is not None else None,
        "parameters": sum(p.numel() for p in module.parameters()),
        "generated": getattr(module, "numel", None),
    }


def within(
    hypernetwork: float, direct: float, *, tolerance: float = 0.1, higher_is_better: bool = False
) -> bool:
    r"""Whether the hypernetwork's metric is no worse than direct training's by more than
    ``tolerance`` (relative to direct's); being better always counts."""
    margin = tolerance * abs(direct)
    return hypernetwork >= direct - margin if higher_is_better else hypernetwork <= direct + margin


def lr_factor(config: Config, step: int) -> float:
    r"""The factor of every learning rate at ``step``: a cosine decay to 0 over ``config.steps``
    (or 1 with ``config.cosine`` false)."""
    return 0.5 * (1 + math.cos(math.pi * step / config.steps)) if config.cosine else 1.0


def mean_loss(losses: list[Tensor]) -> Tensor:
    r"""``sum(losses) / len(losses)``, as a Tensor for type checkers."""
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total / len(losses)


def plot_losses(
    ax: Axes, history: dict[str, list[float]], *, ylabel: str = "training loss"
) -> None:
    r"""Training losses of the hypernetwork and of direct training, smoothed over ~1% of steps."""
    for key, label, color in (("hypernetwork", "hypernetwork", "C0"), ("direct", "direct", "C1")):
        values = torch.tensor(history.get(key, []), dtype=torch.float64)
        if values.numel() == 0:
            continue
        window = max(1, values.numel() // 100)
        smooth = values.unfold(0, window, window).mean(1) if values.numel() >= window else values
        steps = torch.arange(smooth.numel()) * window + window
        ax.plot(steps, smooth, color=color, label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
