r"""Digit images as datasets, for the VAE and DDPM experiments: one dataset, or one per class.

With ``amortized`` false there is one dataset, the whole training split; each step draws
``batch_size`` images of it. With ``amortized`` true each digit class is a dataset: each step
draws a class, then ``batch_size`` images of that class (the set the hypernetwork reads). At
evaluation a dataset's model is generated from all its training images and scored on its
held-out (test) images.

:class:`DigitsConfig` holds the data fields both experiments' configs share, and
:class:`DigitsTask` what their tasks share: the sets, and how a step draws one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from experiments.common.data import Images, load_images
from experiments.experiment import Task

if TYPE_CHECKING:
    from experiments.config import Config

__all__ = ["DigitSets", "DigitsConfig", "DigitsTask"]


@dataclass
class DigitsConfig:
    r"""The data fields of ``config.task`` for experiments on digit images."""

    dataset: Literal["digits", "mnist"] = "digits"
    data_path: str = ""  # for "mnist": an .npz file or a folder of IDX files
    test_fraction: float = 0.25
    max_train: int = 0  # use at most this many training images (0: all)

    def validate(self, where: str) -> None:
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"{where}.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.dataset == "mnist" and not self.data_path:
            raise ValueError(
                f"{where}.data_path must name MNIST's .npz file or IDX folder for dataset='mnist'"
            )
        if self.max_train < 0:
            raise ValueError(f"{where}.max_train must be >= 0, got {self.max_train!r}")


class DigitSets:
    r"""Training images split into datasets: one (all images) or one per class.

    Args:
        config: The run's config (``task`` holds the data options).
        transform: Maps images ``(N, 1, H, W)`` in [0, 1] to what the downstream takes.
    """

    def __init__(self, config: Config, transform: Callable[[Tensor], Tensor]) -> None:
        t = config.task
        self.images: Images = load_images(
            t.dataset,
            data_path=t.data_path,
            test_fraction=t.test_fraction,
            max_train=t.max_train,
            seed=config.seed,
        )
        self.batch_size = config.batch_size
        self.x_train, self.x_test = transform(self.images.x_train), transform(self.images.x_test)
        if config.amortized:
            self.classes = sorted(set(self.images.y_train.tolist()))
            self.train_index = [torch.nonzero(self.images.y_train == c)[:, 0] for c in self.classes]
            self.test_index = [torch.nonzero(self.images.y_test == c)[:, 0] for c in self.classes]
        else:
            self.classes = [-1]
            self.train_index = [torch.arange(len(self.x_train))]
            self.test_index = [torch.arange(len(self.x_test))]

    def __len__(self) -> int:
        return len(self.classes)

    def sample(self, generator: torch.Generator) -> tuple[int, Tensor]:
        r"""A dataset index and ``batch_size`` of its training images (without replacement when
        it has enough)."""
        k = (
            int(torch.randint(len(self.classes), (1,), generator=generator))
            if len(self.classes) > 1
            else 0
        )
        index = self.train_index[k]
        if len(index) >= self.batch_size:
            pick = torch.randperm(len(index), generator=generator)[: self.batch_size]
        else:
            pick = torch.randint(len(index), (self.batch_size,), generator=generator)
        return k, self.x_train[index[pick]]

    def train(self, k: int) -> Tensor:
        return self.x_train[self.train_index[k]]

    def test(self, k: int) -> Tensor:
        return self.x_test[self.test_index[k]]


class DigitsTask(Task):
    r"""A task on :class:`DigitSets`: each of its datasets has a directly trained downstream,
    and each step draws one set. Subclasses build ``downstream``."""

    def __init__(
        self, config: Config, device: torch.device, transform: Callable[[Tensor], Tensor]
    ) -> None:
        super().__init__(config, device)
        self.sets = DigitSets(config, transform)
        self.input_dim = self.sets.x_train[0].numel()
        self.example_shape = tuple(self.sets.images.x_train.shape[1:])  # (1, H, W)
        self.num_datasets = len(self.sets)

    def sample(self, generator: torch.Generator) -> tuple[int, Tensor]:
        k, batch = self.sets.sample(generator)
        return k, batch.to(self.device)
