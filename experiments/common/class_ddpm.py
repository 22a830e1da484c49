r"""The DDPM experiment's second direct baseline: one DDPM with a class embedding
(``DDPM(num_classes=...)``, the standard class-conditional DDPM) in place of one UNet per
class, trained as the trainer trains the direct UNets, on a replay of its draws."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from experiments.common.fit import fit
from torchhyper.zoo import DDPM

if TYPE_CHECKING:
    from experiments.tasks.ddpm import DDPMTask

__all__ = ["class_baseline", "class_ddpm", "class_loss", "sample_class", "train_class_ddpm"]


def class_ddpm(task: DDPMTask) -> DDPM:
    r"""The task's downstream with a class embedding, one class per dataset, initialized as the
    direct UNets are (the class embedding: diffusers' init, drawn with the global RNG)."""
    model = DDPM(task.sets.images.size, **task.ddpm_options, num_classes=len(task.sets))
    missing, unexpected = model.load_state_dict(task.init, strict=False)
    if unexpected or missing != ["unet.class_embedding.weight"]:
        raise RuntimeError(f"class DDPM vs downstream: missing {missing}, extra {unexpected}")
    return model.to(task.device)


def class_loss(model: DDPM, sets: list[tuple[int, Tensor]]) -> Tensor:
    r"""The denoising loss of ``model`` on all ``sets`` in one batch, each image labelled with
    its set's dataset index ``k``: the mean of the per-set losses when the sets are of one size
    (as :func:`~experiments.train.train_step` averages the direct UNets' losses)."""
    x = torch.cat([batch for _, batch in sets])
    labels = torch.cat([torch.full((len(b),), k, device=x.device) for k, b in sets])
    losses: Tensor = model(x, labels)
    return losses.mean()


def train_class_ddpm(task: DDPMTask, model: DDPM) -> list[float]:
    r"""Trains ``model`` as the trainer trains the direct UNets (:func:`~experiments.common.fit.
    fit`: ``config.steps`` steps at ``direct_lr``, cosine decay if ``config.cosine``), each step
    on the sets the trainer drew at that step (its generator, seeded with ``config.seed``,
    replayed). Returns the loss of each step."""
    c = task.config
    generator = torch.Generator().manual_seed(c.seed)  # the trainer's, from its start

    def loss() -> Tensor:
        return class_loss(model, [task.sample(generator) for _ in range(c.sets_per_step)])

    model.train()
    return fit(
        model.parameters(), loss, steps=c.steps, lr=c.direct_lr, cosine=c.cosine, desc="class UNet"
    )


def class_baseline(task: DDPMTask) -> tuple[DDPM, list[float]]:
    r"""The class-conditional DDPM, trained (:func:`train_class_ddpm`) and in eval mode, and its
    losses. It reseeds the global RNG (``seed + 3000``): call it inside
    ``torch.random.fork_rng``, as the task's ``evaluate`` does, so it draws the same wherever it
    runs."""
    torch.manual_seed(task.config.seed + 3000)
    model = class_ddpm(task)
    losses = train_class_ddpm(task, model)
    return model.eval(), losses


def sample_class(
    task: DDPMTask, model: DDPM, k: int, n: int, generator: torch.Generator | None = None
) -> Tensor:
    r"""``n`` images ``(n, 1, H, W)`` of dataset ``k`` from the class-conditional ``model``,
    with the task's ``sample_steps`` reverse steps."""
    labels = torch.full((n,), k, device=task.device)
    return model.sample(n, steps=task.t.sample_steps, generator=generator, class_labels=labels)
