r"""The experiments' plots: one style, readable where the docs show them.

Each plot is at least :data:`WIDTH` inches wide, 1120 pixels at the default ``plot_dpi`` of 70,
its text at least 18 points (17 pixels there): still 11 pixels where the README shows the GMM's
at 720 pixels wide.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["WIDTH", "figure", "panels", "plot_losses", "tile"]

WIDTH = 16.0  # inches: the narrowest plot
PANEL = (6.4, 5.6)  # inches: one panel of a row
STYLE: dict[str, Any] = {
    "font.size": 20,
    "axes.titlesize": 21,
    "axes.labelsize": 20,
    "legend.fontsize": 18,
    "xtick.labelsize": 18,
    "ytick.labelsize": 18,
    "lines.linewidth": 3,
    "lines.markersize": 10,
    "axes.linewidth": 1.5,
}


@contextmanager
def figure(path: Path, *, dpi: int, size: tuple[float, float]) -> Iterator[Figure]:
    r"""A figure of ``size`` inches (at least :data:`WIDTH` wide) in the plots' style, saved to
    ``path`` at ``dpi`` when the body ends, and closed even when it raises."""
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(max(WIDTH, size[0]), size[1]), layout="constrained")
        try:
            yield fig
            fig.savefig(path, dpi=dpi)
        finally:
            plt.close(fig)


@contextmanager
def panels(path: Path, n: int, *, dpi: int) -> Iterator[list[Axes]]:
    r"""A row of ``n`` panels, saved to ``path`` as :func:`figure` saves it."""
    with figure(path, dpi=dpi, size=(PANEL[0] * n, PANEL[1])) as fig:
        yield list(fig.subplots(1, n, squeeze=False)[0])


def plot_losses(
    ax: Axes,
    history: dict[str, list[float]],
    *,
    ylabel: str = "training loss",
    labels: dict[str, str] | None = None,
) -> None:
    r"""The training losses of each model in ``history`` (``hypernetwork``, ``direct``, ...,
    colors in that order), smoothed over ~1% of the steps; ``labels`` renames them."""
    for i, (key, losses) in enumerate(history.items()):
        values = torch.tensor(losses, dtype=torch.float64)
        if values.numel() == 0:
            continue
        window = max(1, values.numel() // 100)
        smooth = values.unfold(0, window, window).mean(1)
        steps = torch.arange(smooth.numel()) * window + window
        ax.plot(steps, smooth, color=f"C{i}", label=(labels or {}).get(key, key))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title("training loss")
    ax.legend()


def tile(rows: list[Tensor], columns: int, *, fill: float) -> Tensor:
    r"""One image of the first ``columns`` images ``(N, 1, S, S)`` of each of ``rows``, a blank
    pixel of value ``fill`` between images: ``(rows * (S + 1) - 1, columns * (S + 1) - 1)``."""
    side = rows[0].shape[-1]
    canvas = torch.full(
        (len(rows) * (side + 1) - 1, columns * (side + 1) - 1), fill, dtype=torch.float32
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row[:columns]):
            y, x = r * (side + 1), c * (side + 1)
            canvas[y : y + side, x : x + side] = image.reshape(side, side).float()
    return canvas
