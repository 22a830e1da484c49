r"""The time of one training step of several models, measured fairly: interleaved, in a
rotating order, after warm-up, on the same batches."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from experiments.common.fit import CosineAdam

__all__ = ["median_step_ms"]


def median_step_ms(
    steps: dict[str, tuple[CosineAdam, Callable[[Any], Tensor]]],
    draw: Callable[[], Any],
    *,
    rounds: int,
    warmup: int = 3,
    device: torch.device,
) -> dict[str, float]:
    r"""The median milliseconds of one step (the loss, its gradients, the optimizer's update)
    of each of ``steps`` (name -> its optimizer and its loss of a batch).

    Each of ``warmup + rounds`` rounds draws one batch (``draw()``) and steps every model on it,
    the order rotated by one each round; the first ``warmup`` rounds are not timed. Each step
    ends with ``.item()`` on its loss, as the trainer's does, so that it waits for the device.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        batch = draw()
        for name in names[r % len(names) :] + names[: r % len(names)]:
            optimizer, loss = steps[name]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            optimizer.step(loss(batch)).item()
            if r >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(ms) for name, ms in times.items()}
