"""Per-sample weights: applying B parameter sets, and a full per-sample training step.

    python benchmarks/per_sample.py [--rounds=15] [--batch=256]

Table 1 (applying only): B = 256 weight sets of an MLP 16-64-64-1, one input each, applied by
hand-written batched forms (broadcast multiply-sum, baddbmm, einsum), by
``torchhyper.per_sample_call``, by ``torch.func.vmap(functional_call)`` and by a Python loop of
``functional_call``; forward only (no_grad) and forward + backward (gradients to the weights).
Table 2 (training step): ``HyperNetwork.per_sample`` + ``per_sample_call`` + MSE + backward +
Adam, against the same model written by hand (encoder, LayerNorm, dense head, baddbmm apply),
with and without the library's per-tensor ``offset + scale * gain * h`` assembly (the
hypernetwork with ``base="none"``, whose arithmetic the hand-written one repeats).

Variants are interleaved within each round; times are medians over rounds, 1 thread. Ratios are
to the fastest hand-written form measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from record import header  # benchmarks/record.py
from torch import nn
from torch.func import functional_call, vmap

from torchhyper import HyperNetwork, per_sample_call

SIZES = [16, 64, 64, 1]


def mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def timeit(variants: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each variant, the variants interleaved within each round."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():  # warm up
        f()
    for _ in range(rounds):
        for name, f in variants.items():
            start = time.perf_counter()
            for _ in range(inner):
                f()
            times[name].append((time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def table(title: str, result: dict[str, float], hand: list[str]) -> None:
    best = min(result[k] for k in hand)
    print(f"\n{title}\n| variant | time (µs) | vs fastest hand-written |\n|---|---|---|")
    for name, t in result.items():
        print(f"| {name} | {t * 1e6:.0f} | {t / best:.2f}x |")


def apply_only(batch: int, rounds: int) -> None:
    downstream = mlp()
    params = {
        n: torch.randn(batch, *p.shape) / p.shape[-1] ** 0.5
        for n, p in downstream.named_parameters()
    }
    x = torch.randn(batch, SIZES[0])
    names = [(f"{i}.weight", f"{i}.bias") for i in range(0, 2 * len(SIZES) - 3, 2)]

    def multiply_sum(p: dict) -> torch.Tensor:
        h = x
        for k, (w, b) in enumerate(names):
            h = (p[w] * h.unsqueeze(1)).sum(-1) + p[b]
            h = h.relu() if k < len(names) - 1 else h
        return h

    def baddbmm(p: dict) -> torch.Tensor:
        h = x.unsqueeze(1)
        for k, (w, b) in enumerate(names):
            h = torch.baddbmm(p[b].unsqueeze(1), h, p[w].transpose(1, 2))
            h = h.relu() if k < len(names) - 1 else h
        return h.squeeze(1)

    def einsum(p: dict) -> torch.Tensor:
        h = x
        for k, (w, b) in enumerate(names):
            h = torch.einsum("boi,bi->bo", p[w], h) + p[b]
            h = h.relu() if k < len(names) - 1 else h
        return h

    vmapped = vmap(lambda p, a: functional_call(downstream, p, (a,)))
    variants: dict[str, Callable[[dict], torch.Tensor]] = {
        "hand: broadcast multiply-sum": multiply_sum,
        "hand: baddbmm": baddbmm,
        "hand: einsum": einsum,
        "torchhyper.per_sample_call": lambda p: per_sample_call(downstream, p, x),
        "vmap(functional_call)": lambda p: vmapped(p, x),
        "Python loop of functional_call": lambda p: torch.stack(
            [
                functional_call(downstream, {k: v[i] for k, v in p.items()}, x[i])
                for i in range(batch)
            ]
        ),
    }
    reference = baddbmm(params)
    for name, f in variants.items():
        err = (f(params) - reference).abs().max().item()
        assert err < 1e-4, (name, err)
    hand = [k for k in variants if k.startswith("hand")]

    with torch.no_grad():
        result = timeit({k: (lambda f=f: f(params)) for k, f in variants.items()}, rounds, 20)
    table(
        f"Applying only, forward (no_grad), B={batch}, MLP {'-'.join(map(str, SIZES))}",
        result,
        hand,
    )

    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}

    def backward(f: Callable[[dict], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(f(leaves).sum(), list(leaves.values()))

    result = timeit({k: backward(f) for k, f in variants.items()}, rounds, 10)
    table(f"Applying only, forward + backward, B={batch}", result, hand)


class HandWritten(nn.Module):
    """The per-sample generator written by hand: encoder, LayerNorm, one dense head."""

    def __init__(
        self, context: int, hidden: list[int], reference: HyperNetwork, assemble: bool
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(context, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU()
        )
        self.head = nn.Linear(hidden[-1], reference.numel)
        self.numels = reference.generated.numels
        self.assemble = assemble
        if assemble:
            self.gain = nn.Parameter(reference.gain.detach().clone())
            self.register_buffer("spread", reference.spread.clone())
            self.register_buffer("offset", reference.offset.clone())
            self.register_buffer("counts", torch.tensor(reference.generated.numels))

    def forward(self, c: torch.Tensor) -> list[torch.Tensor]:
        h = self.head(F.layer_norm(self.encoder(c), (self.encoder[-2].out_features,)))
        if self.assemble:
            coef = torch.repeat_interleave(
                self.spread * self.gain, self.counts, output_size=h.shape[-1]
            )
            off = torch.repeat_interleave(self.offset, self.counts, output_size=h.shape[-1])
            h = torch.addcmul(off, coef, h)
        return list(h.split(self.numels, dim=-1))


def training_step(batch: int, rounds: int) -> None:
    context, hidden = 8, [64, 64]
    downstream = mlp().requires_grad_(False)
    c, x, y = torch.randn(batch, context), torch.randn(batch, SIZES[0]), torch.randn(batch, 1)

    # The original's full generation, which the hand-written generator below reproduces.
    hyper = HyperNetwork(context, hidden, downstream, head="dense", base="none")
    plain = HandWritten(context, hidden, hyper, assemble=False)
    same_math = HandWritten(context, hidden, hyper, assemble=True)
    shapes = hyper.shapes

    def library_step(opt: torch.optim.Optimizer) -> None:
        pred = per_sample_call(downstream, hyper.per_sample(c), x)
        loss = F.mse_loss(pred, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def hand_step(model: HandWritten, opt: torch.optim.Optimizer) -> None:
        flat = model(c)
        h = x.unsqueeze(1)
        for k in range(0, len(flat), 2):
            w = flat[k].view(batch, *shapes[k])
            h = torch.baddbmm(flat[k + 1].unsqueeze(1), h, w.transpose(1, 2))
            h = h.relu() if k < len(flat) - 2 else h
        loss = F.mse_loss(h.squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    opts = {m: torch.optim.Adam(m.parameters(), lr=1e-4) for m in (hyper, plain, same_math)}
    variants = {
        "hand: generator + baddbmm apply": lambda: hand_step(plain, opts[plain]),
        "hand: same + per-tensor gain/offset, unfused (addcmul)": lambda: hand_step(
            same_math, opts[same_math]
        ),
        "torchhyper: per_sample + per_sample_call": lambda: library_step(opts[hyper]),
    }
    result = timeit(variants, rounds, 5)
    n = sum(p.numel() for p in hyper.parameters())
    table(
        f"Full per-sample training step (forward, backward, Adam), B={batch}, context {context}, "
        f"encoder {hidden}, dense head ({n} hypernetwork parameters, {hyper.numel} generated)",
        result,
        [k for k in variants if k.startswith("hand")],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(header())
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} interleaved rounds, medians")
    apply_only(args.batch, args.rounds)
    training_step(args.batch, args.rounds)


if __name__ == "__main__":
    main()
