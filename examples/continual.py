"""Continual learning with an embedding-conditioned hypernetwork (von Oswald et al. 2020).

Three regression tasks arrive one after another, as in the paper's toy problem: task t is the
cubic y = (x - m_t)^3 on x in [m_t - 1, m_t + 1], with m = -3, 0, 3, observed with noise. One
``EmbeddingHyperNetwork`` generates an MLP per task id. After each task, the weights it generates
for every task seen so far are stored; while learning the next task, ``output_regularizer`` keeps
the generated weights of old tasks close to the stored ones. The script trains twice, with the
regularizer (``beta > 0``) and without it (``beta = 0``: plain fine-tuning of the hypernetwork,
which forgets), and compares each task's error after the last task.

    python examples/continual.py --steps=4000 --beta=0.01 --out=runs/continual

Writes ``continual.png`` (each task's generated MLP after all tasks, both runs) and
``metrics.json`` (per-task MSE right after learning it and after all tasks).

References:
    | Continual learning with hypernetworks (von Oswald et al., 2020)
    | https://arxiv.org/abs/1906.00695
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.func import functional_call

from torchhyper import EmbeddingHyperNetwork, output_regularizer

CENTERS = [-3.0, 0.0, 3.0]


def task_data(
    t: int, n: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    x = CENTERS[t] + 2 * torch.rand(n, 1, generator=generator) - 1
    y = (x - CENTERS[t]) ** 3 + noise * torch.randn(n, 1, generator=generator)
    return x, y


def train(
    beta: float, args: argparse.Namespace, downstream: nn.Module
) -> tuple[EmbeddingHyperNetwork, dict]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tasks = len(CENTERS)
    hypernetwork = EmbeddingHyperNetwork(
        tasks, 8, downstream, hidden_sizes=[32, 32], base=args.base
    )
    data = [task_data(t, 50, args.noise, gen) for t in range(tasks)]
    test = [task_data(t, 200, 0.0, torch.Generator().manual_seed(100 + t)) for t in range(tasks)]

    def mse(t: int) -> float:
        # In eval mode: a training-mode call would move the running mean of the embeddings.
        hypernetwork.eval()
        try:
            with torch.no_grad():
                return (
                    (functional_call(downstream, hypernetwork(t), test[t][0]) - test[t][1])
                    .square()
                    .mean()
                    .item()
                )
        finally:
            hypernetwork.train()

    just_learned = []
    for t in range(tasks):
        old = torch.arange(t)
        # What the hypernetwork generates for the earlier tasks now, to be kept.
        targets = {k: v.detach() for k, v in hypernetwork(old).items()} if t else None
        optimizer = torch.optim.Adam(hypernetwork.parameters(), lr=1e-3)
        x, y = data[t]
        for _ in range(args.steps):
            loss = (functional_call(downstream, hypernetwork(t), x) - y).square().mean()
            if targets is not None and beta > 0:
                loss = loss + beta * output_regularizer(hypernetwork(old), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        just_learned.append(mse(t))
        print(
            f"beta={beta:g}: task {t} learned, MSE {just_learned[-1]:.4f}; "
            f"earlier tasks now {[round(mse(k), 4) for k in range(t)]}"
        )
    return hypernetwork, {"just_learned": just_learned, "after_all": [mse(t) for t in range(tasks)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="steps per task")
    parser.add_argument("--beta", type=float, default=0.01, help="output regularizer strength")
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", choices=["learned", "frozen", "none"], default="learned")
    parser.add_argument("--threads", type=int, default=1, help="small models run fastest on one")
    parser.add_argument("--out", type=Path, default=Path("runs/continual"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    downstream = nn.Sequential(
        nn.Linear(1, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1)
    )
    downstream.requires_grad_(False)
    runs = {
        "regularized": train(args.beta, args, downstream),
        "fine-tuned (beta=0)": train(0.0, args, downstream),
    }

    args.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, (name, (hypernetwork, result)) in zip(axes, runs.items()):
        for t, center in enumerate(CENTERS):
            grid = torch.linspace(center - 1, center + 1, 100)[:, None]
            with torch.no_grad():
                fit = functional_call(downstream, hypernetwork(t), grid)
            ax.plot(grid, (grid - center) ** 3, "k:", lw=1)
            ax.plot(grid, fit, f"C{t}-", label=f"task {t}: MSE {result['after_all'][t]:.3g}")
        ax.set_title(f"{name}, after all tasks")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "continual.png", dpi=100)
    plt.close(fig)
    metrics = {name: result for name, (_, result) in runs.items()} | {
        "config": vars(args) | {"out": str(args.out)}
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
