"""Set-conditioned regression: a hypernetwork reads a few (x, y) points of a sine wave and
generates the weights of an MLP that fits the whole wave.

    python examples/sine_demo.py --steps=1500 --out=runs/sine

Writes ``sine.png`` (held-out waves and the generated MLPs' fits) and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.func import functional_call
from tqdm import trange

from torchhyper import HyperNetwork


def waves(n: int, points: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random waves, ``points`` samples each: x (n, points, 1), y (n, points, 1)."""
    amplitude = 0.5 + 1.5 * torch.rand(n, 1, 1, generator=generator)
    phase = math.pi * torch.rand(n, 1, 1, generator=generator)
    x = 10 * torch.rand(n, points, 1, generator=generator) - 5
    return x, amplitude * torch.sin(x + phase)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--context", type=int, default=20, help="points the hypernetwork sees")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/sine"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    downstream = nn.Sequential(nn.Linear(1, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1))
    downstream.requires_grad_(False)
    hypernetwork = HyperNetwork(2, [64, 64], downstream)
    optimizer = torch.optim.Adam(hypernetwork.parameters(), lr=1e-3)

    def loss_on(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        context = torch.cat([x[: args.context], y[: args.context]], dim=-1)
        pred = functional_call(downstream, hypernetwork(context), x)
        return (pred - y).square().mean()

    losses = []
    for _ in (bar := trange(args.steps, desc="sine")):
        x, y = waves(8, 100, gen)
        loss = torch.stack([loss_on(xi, yi) for xi, yi in zip(x, y)]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(mse=f"{loss.item():.4f}")

    test_x, test_y = waves(64, 100, torch.Generator().manual_seed(10_000))
    with torch.no_grad():
        test_mse = torch.stack([loss_on(xi, yi) for xi, yi in zip(test_x, test_y)]).mean().item()
    baseline = test_y.var(dim=1).mean().item()  # predicting each wave's mean

    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    grid = torch.linspace(-5, 5, 200)[:, None]
    for ax, xi, yi in zip(axes[:3], test_x, test_y):
        context = torch.cat([xi[: args.context], yi[: args.context]], dim=-1)
        with torch.no_grad():
            fit = functional_call(downstream, hypernetwork(context), grid)
        order = xi[:, 0].argsort()
        ax.plot(xi[order, 0], yi[order, 0], "k-", lw=1, label="truth")
        ax.plot(grid[:, 0], fit[:, 0], "C1-", label="generated MLP")
        ax.plot(xi[: args.context, 0], yi[: args.context, 0], "C0o", ms=3, label="context")
    axes[0].legend(fontsize=7)
    axes[3].semilogy(losses)
    axes[3].set_title("training MSE")
    fig.tight_layout()
    fig.savefig(args.out / "sine.png", dpi=100)
    metrics = {"test_mse": test_mse, "mean_baseline_mse": baseline, "steps": args.steps}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
