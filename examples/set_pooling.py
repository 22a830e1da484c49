"""Set-conditioned hypernetworks with different pooling: mean, max and attention (Set Transformer
PMA). A hypernetwork reads a set of noisy (x, y) observations of a random function (a sum of two
sinusoids) and generates an MLP that fits the whole function. Each step trains on a batch of
functions at once: ``per_set`` generates one MLP per context set, ``per_sample_call`` evaluates
each MLP on its own query points, in one call.

    python examples/set_pooling.py --steps=2000 --out=runs/set_pooling

Writes ``set_pooling.png`` (training curves, and fits on held-out functions per pooling) and
``metrics.json`` (held-out MSE per pooling, and the MSE of predicting each function's mean).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from torchhyper import HyperNetwork, per_sample_call

POOLS = ["mean", "max", "attention"]


def functions(n: int, points: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random functions, ``points`` samples each: x, y of shape (n, points, 1)."""
    amplitude = 0.5 + torch.rand(n, 2, generator=generator)
    frequency = 0.5 + 1.5 * torch.rand(n, 2, generator=generator)
    phase = 2 * math.pi * torch.rand(n, 2, generator=generator)
    x = 8 * torch.rand(n, points, 1, generator=generator) - 4
    y = (amplitude[:, None] * torch.sin(frequency[:, None] * x + phase[:, None])).sum(
        -1, keepdim=True
    )
    return x, y


def split(x: torch.Tensor, y: torch.Tensor, context: int, noise: float, generator: torch.Generator):
    """Context sets (n, context, 2) of noisy pairs; the rest of the points are the queries."""
    observed = y[:, :context] + noise * torch.randn(y[:, :context].shape, generator=generator)
    return torch.cat([x[:, :context], observed], dim=-1), x[:, context:], y[:, context:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=16, help="functions per step")
    parser.add_argument("--context", type=int, default=20, help="points the hypernetwork sees")
    parser.add_argument("--queries", type=int, default=60, help="points the MLP is fit on")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="small models run fastest on one")
    parser.add_argument("--out", type=Path, default=Path("runs/set_pooling"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    downstream = nn.Sequential(
        nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )
    downstream.requires_grad_(False)
    test_gen = torch.Generator().manual_seed(10_000)
    test = split(*functions(256, args.context + 100, test_gen), args.context, args.noise, test_gen)

    results: dict[str, dict] = {}
    models: dict[str, HyperNetwork] = {}
    for pool in POOLS:
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        hypernetwork = HyperNetwork(2, [64, 64], downstream, pool=pool)
        optimizer = torch.optim.Adam(hypernetwork.parameters(), lr=1e-3)
        losses = []
        start = time.perf_counter()
        for _ in range(args.steps):
            context, xq, yq = split(
                *functions(args.tasks, args.context + args.queries, gen),
                args.context,
                args.noise,
                gen,
            )
            params = hypernetwork.per_set(context)  # one MLP per function: (S, *shape)
            pred = per_sample_call(downstream, params, xq)  # MLP s on its queries: (S, queries, 1)
            loss = (pred - yq).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            test_mse = (
                (per_sample_call(downstream, hypernetwork.per_set(test[0]), test[1]) - test[2])
                .square()
                .mean()
            )
        results[pool] = {
            "test_mse": test_mse.item(),
            "losses": losses,
            "seconds": time.perf_counter() - start,
        }
        models[pool] = hypernetwork
        print(f"{pool:>9}: held-out MSE {test_mse.item():.4f}  ({results[pool]['seconds']:.0f} s)")

    baseline = test[2].var(dim=1, unbiased=False).mean().item()  # predicting each function's mean
    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    window = max(1, args.steps // 50)
    for pool in POOLS:
        curve = torch.tensor(results[pool]["losses"]).unfold(0, window, window).mean(1)
        axes[0].semilogy(
            torch.arange(len(curve)) * window,
            curve,
            label=f"{pool} ({results[pool]['test_mse']:.3f})",
        )
    axes[0].axhline(baseline, color="gray", ls=":", label="function mean")
    axes[0].set(title="training MSE (held-out MSE)", xlabel="step")
    axes[0].legend(fontsize=7)
    grid = torch.linspace(-4, 4, 200).expand(3, 200).unsqueeze(-1)
    for k, ax in enumerate(axes[1:]):
        order = test[1][k, :, 0].argsort()
        ax.plot(test[1][k, order, 0], test[2][k, order, 0], "k-", lw=1, label="truth")
        ax.plot(test[0][k, :, 0], test[0][k, :, 1], "ko", ms=3, label="context")
        for j, pool in enumerate(POOLS):
            with torch.no_grad():
                fit = per_sample_call(downstream, models[pool].per_set(test[0][:3]), grid)
            ax.plot(grid[k, :, 0], fit[k, :, 0], f"C{j}-", lw=1.2, label=pool)
        ax.set_title(f"held-out function {k}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "set_pooling.png", dpi=100)
    plt.close(fig)
    metrics = {
        "test_mse": {p: results[p]["test_mse"] for p in POOLS},
        "function_mean_mse": baseline,
        "seconds": {p: round(results[p]["seconds"], 1) for p in POOLS},
        "config": vars(args) | {"out": str(args.out)},
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
