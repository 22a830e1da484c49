r"""How the experiments train a model, written once: Adam with a cosine decay of its learning
rates to 0 over the run's steps.

The trainer (:mod:`experiments.train`) steps each of its models with a :class:`CosineAdam`;
every other fit (a held-out dataset fitted directly, the DDPM's class-conditional baseline, the
judge's classifier) is :func:`fit`, the same optimizer in a plain loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

if TYPE_CHECKING:
    from experiments.experiment import Task

__all__ = ["CosineAdam", "cosine_factor", "fit", "fit_direct", "held_out_fits", "mean_loss"]


def cosine_factor(step: int, *, steps: int, cosine: bool = True) -> float:
    r"""The factor of every learning rate at ``step``: a half cosine from 1 at step 0 to 0 at
    ``steps`` (1 throughout with ``cosine=False``)."""
    return 0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else 1.0


class CosineAdam:
    r"""Adam whose learning rates follow :func:`cosine_factor` over ``steps`` steps.

    Args:
        params: Parameters or parameter groups, as ``torch.optim.Adam`` takes them.
        lr: The learning rate of groups that set none.
        steps: Steps of the decay.
        cosine: ``False``: constant learning rates.
        weight_decay: Adam's L2 penalty.

    Attributes:
        optimizer: The ``torch.optim.Adam``.
        scheduler: Its ``LambdaLR`` schedule (both go into a checkpoint).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        steps: int,
        cosine: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        factor = functools.partial(cosine_factor, steps=steps, cosine=cosine)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def step(self, loss: Tensor) -> Tensor:
        r"""One step down ``loss`` (a scalar): its gradients, Adam's update, the next learning
        rate. Returns ``loss``, detached."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()


def fit(
    params: Iterable[Tensor],
    loss: Callable[[], Tensor],
    *,
    steps: int,
    lr: float,
    cosine: bool = True,
    weight_decay: float = 0.0,
    desc: str | None = None,
) -> list[float]:
    r"""Trains ``params`` for ``steps`` steps of :class:`CosineAdam` on ``loss()``, called once
    a step (it draws its own batch, if any); returns the loss of each step. ``desc``: show a
    progress bar with this title."""
    optimizer = CosineAdam(params, lr=lr, steps=steps, cosine=cosine, weight_decay=weight_decay)
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True, mininterval=1.0, disable=desc is None)
    losses = [optimizer.step(loss()) for _ in bar]
    return torch.stack(losses).tolist() if losses else []


def fit_direct(
    downstream: nn.Module,
    loss: Callable[[dict[str, Tensor], Tensor], Tensor],
    data: Tensor,
    *,
    steps: int,
    lr: float,
) -> dict[str, Tensor]:
    r"""The downstream's parameters fitted to ``data`` (full batch) by :func:`fit`, from the
    downstream's own values; detached."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in downstream.named_parameters()}
    fit(params.values(), lambda: loss(params, data), steps=steps, lr=lr)
    return {n: p.detach() for n, p in params.items()}


def held_out_fits(
    task: Task, hypernetwork: nn.Module, data: Tensor, *, steps: int
) -> dict[str, dict[str, Tensor]]:
    r"""What an amortized run compares on a held-out dataset ``data`` ``(B, *)``: the parameters
    the hypernetwork generates from it, and the downstream fitted to it directly
    (:func:`fit_direct`, ``steps`` steps at ``config.direct_lr``)."""
    data = data.to(task.device)
    with torch.no_grad():
        generated = hypernetwork(data)
    direct = fit_direct(task.downstream, task.loss, data, steps=steps, lr=task.config.direct_lr)
    return {"hypernetwork": generated, "direct": direct}


def mean_loss(losses: list[Tensor]) -> Tensor:
    r"""``sum(losses) / len(losses)``, as a Tensor for type checkers."""
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total / len(losses)
