"""Per-sample weights: a separate generated MLP for every example of a batch, applied in one call.

Each training example is (c, x, y) from its own function: c = (amplitude, frequency, phase) of a
sinusoid, x a point, y = amplitude * sin(frequency * x + phase). The hypernetwork reads c and
generates one MLP per example (``HyperNetwork.per_sample``); ``per_sample_call`` evaluates MLP i
at x[i] for the whole batch in one call: the hypernetwork sees c, the downstream sees x. The
script also times one training step against a Python loop of ``functional_call``.

    python examples/per_sample.py --steps=3000 --out=runs/per_sample

Writes ``per_sample.png`` (the generated MLPs for a few held-out c, the training curve, and the
step times) and ``metrics.json``.
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
from torch.func import functional_call

from torchhyper import HyperNetwork, per_sample_call


def sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` examples, each from its own sinusoid: c (n, 3), x (n, 1), y (n, 1)."""
    amplitude = 0.5 + 1.5 * torch.rand(n, 1, generator=generator)
    frequency = 0.5 + 1.5 * torch.rand(n, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    x = 8 * torch.rand(n, 1, generator=generator) - 4
    return (
        torch.cat([amplitude, frequency, phase], -1),
        x,
        amplitude * torch.sin(frequency * x + phase),
    )


def features(c: torch.Tensor) -> torch.Tensor:
    """What the hypernetwork reads: the phase as a point on the circle, so 0 and 2 pi agree."""
    return torch.cat([c[:, :2], torch.sin(c[:, 2:]), torch.cos(c[:, 2:])], -1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256, help="examples (and MLPs) per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="small models run fastest on one")
    parser.add_argument("--out", type=Path, default=Path("runs/per_sample"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    downstream = nn.Sequential(
        nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )
    downstream.requires_grad_(False)
    hypernetwork = HyperNetwork(4, [64, 64], downstream)
    optimizer = torch.optim.Adam(hypernetwork.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)

    def loss_batched(c, x, y):
        params = hypernetwork.per_sample(features(c))  # (B, *shape): one MLP per example
        return (per_sample_call(downstream, params, x) - y).square().mean()

    def loss_loop(c, x, y):
        params = hypernetwork.per_sample(features(c))
        pred = torch.stack(
            [
                functional_call(downstream, {k: v[i] for k, v in params.items()}, x[i])
                for i in range(len(x))
            ]
        )
        return (pred - y).square().mean()

    losses = []
    for step in range(args.steps):
        loss = loss_batched(*sample(args.batch, gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0:
            print(f"step {step:5d}  mse {loss.item():.4f}")

    # Step time (forward + backward) of the one-call apply against a loop, interleaved.
    timing: dict[str, list[float]] = {"per_sample_call": [], "loop of functional_call": []}
    batch = sample(args.batch, gen)
    for _ in range(3):
        for name, fn in (("per_sample_call", loss_batched), ("loop of functional_call", loss_loop)):
            start = time.perf_counter()
            fn(*batch).backward()
            timing[name].append(time.perf_counter() - start)
    times = {k: sorted(v)[1] for k, v in timing.items()}

    test_c, test_x, test_y = sample(4096, torch.Generator().manual_seed(10_000))
    with torch.no_grad():
        test_mse = loss_batched(test_c, test_x, test_y).item()
    baseline = test_y.var().item()

    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    grid = torch.linspace(-4, 4, 200)
    shown = test_c[:4]
    with torch.no_grad():  # each shown MLP on the whole grid: x of shape (4, 200, 1)
        fits = per_sample_call(
            downstream, hypernetwork.per_sample(features(shown)), grid.expand(4, 200)[..., None]
        )
    for k, (a, f, p) in enumerate(shown.tolist()):
        axes[0].plot(grid, a * torch.sin(f * grid + p), f"C{k}:", lw=1)
        axes[0].plot(
            grid, fits[k, :, 0], f"C{k}-", lw=1.5, label=f"a={a:.1f}, f={f:.1f}, p={p:.1f}"
        )
    axes[0].set_title("generated MLPs (solid) vs truth (dotted)")
    axes[0].legend(fontsize=7)
    axes[1].semilogy(losses)
    axes[1].axhline(baseline, color="gray", ls=":", label="predicting 0")
    axes[1].set(title=f"training MSE (held-out {test_mse:.4f})", xlabel="step")
    axes[1].legend(fontsize=7)
    axes[2].bar(list(times), [t * 1e3 for t in times.values()], color=["C0", "C3"])
    axes[2].set(title=f"one step, B={args.batch} (forward + backward)", ylabel="ms")
    fig.tight_layout()
    fig.savefig(args.out / "per_sample.png", dpi=100)
    plt.close(fig)
    metrics = {
        "test_mse": test_mse,
        "zero_prediction_mse": baseline,
        "step_ms": {k: round(v * 1e3, 2) for k, v in times.items()},
        "config": vars(args) | {"out": str(args.out)},
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}))
    return metrics


if __name__ == "__main__":
    main()
