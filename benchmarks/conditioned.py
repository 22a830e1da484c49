"""Conditioned tasks for ``benchmarks/quality.py``: where the best weights differ per input.

Each task takes ``spec``, ``None`` for direct training (the downstream alone, which cannot see
the condition) or ``(head, base)`` for a hypernetwork built as the seed constructor builds it
(``HyperNetwork(input_dim, [32, 64, 96], downstream, head=head, base=base)``; the LoRA tasks
build theirs as ``examples/task_adapters.py`` does), trains it with Adam (lr 1e-3 unless said)
and returns its held-out loss (lower is better).

* ``coords``: one 8x8 digit to a coordinate MLP 2-64-64-1 (4,417 values, per sample): the
  hypernetwork reads the image and generates an MLP from pixel coordinates in [-1, 1]^2 to
  intensities in [0, 1]; 2000 steps of 32 training images, MSE on the 64 pixels of the 297
  held-out digits (PSNR = -10 log10 MSE).
* ``teacher``: per-sample regression of a fixed random teacher MLP 16-64-64-1 on x ~ N(0, I):
  the hypernetwork reads each input and generates the student MLP 16-64-64-1 that it is fed
  to; 300 steps of 128 inputs, MSE on 2048 fresh inputs.
* ``sinusoid``: few-shot regression (Finn et al. 2017): amplitude U(0.1, 5), phase U(0, pi),
  x U(-5, 5). The hypernetwork reads K = 10 (x, y) pairs of a task and generates an MLP
  1-40-40-1 (``per_set``), scored on 10 other points (training) or 100 (held out); 25 tasks a
  step, 2000 steps; held-out MSE over 500 tasks.
* ``line``: a line y = a x + b from 64 noisy points (noise std 0.25, a, b ~ N(0, 1)),
  ``Linear(1, 1)``; 16 lines a step, 1500 steps; MSE on 64 fresh noisy points of 256 held-out
  lines (the noise alone gives 0.0625).
* ``lora-set`` and ``lora-id``: PEFT LoRA (rank 8) on every attention and MLP projection
  (``c_attn``, ``c_proj``, ``c_fc``) of ``examples/task_adapters.py``'s tiny GPT-2, the
  hypernetwork generating only the LoRA tensors (``include="*lora_*"``): from 8 demonstrations
  of a task read as bigram counts (``lora-set``, held-out tasks), or from a task id
  (``lora-id``, ``EmbeddingHyperNetwork``, the first 256 training tasks), 1200 and 600 steps at
  lr 3e-3. Next-token cross-entropy; "direct" is one LoRA fitted per task (200 Adam steps,
  lr 1e-2).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from torchhyper import EmbeddingHyperNetwork, HyperNetwork, per_sample_call

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = [32, 64, 96]
Spec = tuple[str, str] | None

__all__ = ["TASKS"]


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _hyper(spec: tuple[str, str], downstream: nn.Module, input_dim: int) -> HyperNetwork:
    downstream.requires_grad_(False)
    head, base = spec
    return HyperNetwork(input_dim, HIDDEN, downstream, head=head, base=base)


def _train(module: nn.Module, steps: int, loss_fn, lr: float = 1e-3) -> None:
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    module.eval()


def coords(spec: Spec, seed: int, steps: int = 2000, batch: int = 32) -> float:
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().data, dtype=torch.float32) / 16  # (1797, 64)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = images[perm[:1500]], images[perm[1500:]]
    axis = torch.linspace(-1, 1, 8)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(64, 2)
    torch.manual_seed(seed)
    downstream = mlp([2, 64, 64, 1])
    g = torch.Generator().manual_seed(seed + 1)
    hyper = None if spec is None else _hyper(spec, downstream, 64)

    def loss(x: Tensor) -> Tensor:
        if hyper is None:
            out = downstream(grid).squeeze(-1).expand_as(x)
        else:
            out = per_sample_call(downstream, hyper.per_sample(x), grid.expand(len(x), 64, 2))
            out = out.squeeze(-1)
        return (out - x).square().mean()

    _train(
        hyper or downstream,
        steps,
        lambda: loss(train[torch.randint(0, len(train), (batch,), generator=g)]),
    )
    with torch.no_grad():
        return loss(test).item()


def teacher(spec: Spec, seed: int, steps: int = 300, batch: int = 128) -> float:
    torch.manual_seed(1000)
    fixed = mlp([16, 64, 64, 1]).requires_grad_(False)
    torch.manual_seed(seed)
    downstream = mlp([16, 64, 64, 1])
    g = torch.Generator().manual_seed(seed + 1)
    hyper = None if spec is None else _hyper(spec, downstream, 16)

    def loss(x: Tensor) -> Tensor:
        if hyper is None:
            return (downstream(x) - fixed(x)).square().mean()
        return (per_sample_call(downstream, hyper.per_sample(x), x) - fixed(x)).square().mean()

    _train(hyper or downstream, steps, lambda: loss(torch.randn(batch, 16, generator=g)))
    with torch.no_grad():
        return loss(torch.randn(2048, 16, generator=torch.Generator().manual_seed(12345))).item()


def sinusoid(spec: Spec, seed: int, steps: int = 2000, tasks: int = 25, k: int = 10) -> float:
    def draw(g: torch.Generator, n: int, queries: int) -> tuple[Tensor, Tensor, Tensor]:
        amplitude = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=g)
        phase = math.pi * torch.rand(n, 1, 1, generator=g)
        x = 10 * torch.rand(n, k + queries, 1, generator=g) - 5
        y = amplitude * torch.sin(x - phase)
        return torch.cat([x[:, :k], y[:, :k]], -1), x[:, k:], y[:, k:]

    torch.manual_seed(seed)
    downstream = mlp([1, 40, 40, 1])
    g = torch.Generator().manual_seed(seed + 1)
    hyper = None if spec is None else _hyper(spec, downstream, 2)

    def loss(support: Tensor, x: Tensor, y: Tensor) -> Tensor:
        if hyper is None:
            return (downstream(x) - y).square().mean()
        return (per_sample_call(downstream, hyper.per_set(support), x) - y).square().mean()

    _train(hyper or downstream, steps, lambda: loss(*draw(g, tasks, k)))
    with torch.no_grad():
        return loss(*draw(torch.Generator().manual_seed(12345), 500, 100)).item()


def line(spec: Spec, seed: int, steps: int = 1500, lines: int = 16, n: int = 64) -> float:
    def draw(g: torch.Generator, count: int) -> tuple[Tensor, ...]:
        ab = torch.randn(count, 1, 2, generator=g)
        x, xq = (2 * torch.rand(count, n, 1, generator=g) - 1 for _ in range(2))
        y, yq = (ab[..., :1] * t + ab[..., 1:] + 0.25 * torch.randn_like(t) for t in (x, xq))
        return torch.cat([x, y], -1), xq, yq

    torch.manual_seed(seed)
    downstream = nn.Linear(1, 1)
    g = torch.Generator().manual_seed(seed + 1)
    hyper = None if spec is None else _hyper(spec, downstream, 2)

    def loss(points: Tensor, x: Tensor, y: Tensor) -> Tensor:
        if hyper is None:
            return (downstream(x) - y).square().mean()
        return (per_sample_call(downstream, hyper.per_set(points), x) - y).square().mean()

    def step() -> Tensor:
        points, _, _ = draw(g, lines)  # training: the loss on the points read
        return loss(points, points[..., :1], points[..., 1:])

    _train(hyper or downstream, steps, step)
    with torch.no_grad():
        return loss(*draw(torch.Generator().manual_seed(12345), 256)).item()


def _adapters():
    sys.path.insert(0, str(ROOT / "examples"))
    import task_adapters

    return task_adapters


def _lora_setup(seed: int):
    """The pretrained tiny GPT-2 with LoRA on every projection, frozen, and the task family."""
    from peft import LoraConfig, get_peft_model

    ta = _adapters()
    args = argparse.Namespace(
        width=64, rank=8, length=12, demos=8, rho=128, queries=8, eval_queries=64,
        tasks_per_step=16, held_out=16, train_tasks=4096, id_tasks=256, batch=128,
        pretrain_steps=400, lora_steps=200, lora_lr=1e-2, lr=3e-3,
    )  # fmt: skip
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    held_out = ta.random_tasks(args.held_out, gen)
    train_tasks = ta.random_tasks(args.train_tasks, gen)
    clash = (train_tasks[:, None] == held_out[None]).all(-1).any(-1)
    train_tasks = train_tasks[~clash]
    model = ta.build_base(args)
    ta.pretrain(model, None, args, gen, _NoBar())
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True, lora_dropout=0.0,
    )  # fmt: skip
    peft_model = get_peft_model(model, config).requires_grad_(False).eval()
    return ta, args, peft_model, train_tasks, held_out


class _NoBar:
    def update(self) -> None:
        pass


def lora(spec: Spec, seed: int, by: str) -> float:
    ta, args, peft_model, train_tasks, held_out = _lora_setup(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    eval_gen = torch.Generator().manual_seed(10_000 + seed)
    tasks = held_out if by == "set" else train_tasks[: args.held_out]  # scored on these
    demos = ta.sample(tasks, args.demos, args.length, eval_gen)
    queries = ta.sample(tasks, args.eval_queries, args.length, eval_gen)
    if spec is None:  # one LoRA fitted directly per scored task
        params, _ = ta.fit_lora(peft_model, tasks, args, gen, _NoBar())
        return ta.evaluate(peft_model, params, queries)["loss"]
    head, base = spec
    family = train_tasks if by == "set" else train_tasks[: args.id_tasks]
    hyper: nn.Module
    if by == "set":
        hyper = HyperNetwork(
            ta.P * ta.P, [], peft_model, encoder=nn.Identity(), pool="sum", rho=[args.rho],
            include="*lora_*", head=head, base=base,
        )  # fmt: skip
    else:
        hyper = EmbeddingHyperNetwork(
            len(family), 32, peft_model, hidden_sizes=[64], include="*lora_*", head=head, base=base
        )
    steps = 1200 if by == "set" else 600
    optimizer = torch.optim.Adam(hyper.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    for _ in range(steps):
        ids = torch.randint(0, len(family), (args.tasks_per_step,), generator=gen)
        chosen = family[ids]
        if by == "set":
            params = hyper.per_set(ta.bigrams(ta.sample(chosen, args.demos, args.length, gen)))
        else:
            params = hyper(ids)
        queries_ = ta.sample(chosen, args.queries, args.length, gen)
        loss = ta.run_adapters(peft_model, params, queries_)[0].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    hyper.eval()
    with torch.no_grad():
        if by == "set":
            params = hyper.per_set(ta.bigrams(demos))
        else:
            params = hyper(torch.arange(len(tasks)))
        return ta.evaluate(peft_model, params, queries)["loss"]


# name -> (task(spec, seed) -> held-out loss, generated values)
TASKS = {
    "coords": (coords, 4_417),
    "teacher": (teacher, 5_313),
    "sinusoid": (sinusoid, 1_761),
    "line": (line, 2),
    "lora-set": (lambda spec, seed: lora(spec, seed, "set"), 16_384),
    "lora-id": (lambda spec, seed: lora(spec, seed, "id"), 16_384),
}
