"""Core checks that do not belong in unit tests: init scale on a deep MLP, a fused head against
one Linear per tensor, and torch.compile(fullgraph=True) on the core path (training mode, with
the running mean of the embeddings updated in the compiled graph).

    python benchmarks/core.py            # about a minute on 2 CPU cores
    python benchmarks/core.py --no-compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call

from torchhyper import HyperNetwork
from torchhyper.heads import Head


def deep_mlp(depth: int = 8, width: int = 1024) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, width))


class PerTensorHead(Head):
    """The original torchhyper's layout: one Linear per generated tensor (a baseline only)."""

    def __init__(self, in_features, shapes):
        super().__init__(in_features, shapes)
        self.linears = nn.ModuleList(nn.Linear(in_features, torch.Size(s).numel()) for s in shapes)

    def forward(self, z):
        return torch.cat([lin(z) for lin in self.linears], dim=-1)


def init_scale() -> None:
    torch.manual_seed(0)
    mlp = deep_mlp()
    x = torch.randn(256, 1024)
    with torch.no_grad():
        own = mlp(x).std().item()
        rows = []
        for head in ("dense", "chunked"):
            params = HyperNetwork(1024, [32, 64, 96], mlp, head=head, base="none")(x)
            rows.append((f"{head} head, base none", functional_call(mlp, params, x).std().item()))
        params = HyperNetwork(1024, [32, 64, 96], mlp)(x)
        rows.append(("the default (learned base)", functional_call(mlp, params, x).std().item()))
    print("\n## Output std of an 8-layer, 1024-wide ReLU MLP on N(0, 1) inputs\n")
    print("| weights | output std |\n| --- | --- |")
    print(f"| the module's own init | {own:.4f} |")
    for head, std in rows:
        print(f"| generated at init, {head} | {std:.4f} |")


def median_time(fn, rounds: int = 7, inner: int = 5) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def fused_vs_per_tensor() -> None:
    torch.manual_seed(0)
    downstream = nn.Sequential(*[nn.Linear(64, 64) for _ in range(16)])
    x = torch.randn(128, 64)
    fused = HyperNetwork(64, [32, 64, 96], downstream, head="dense")
    split = HyperNetwork(64, [32, 64, 96], downstream, head=PerTensorHead)
    results = {"fused": [], "per-tensor": []}
    for _ in range(5):  # interleaved rounds
        for name, hyper in (("fused", fused), ("per-tensor", split)):
            results[name].append(median_time(lambda h=hyper: h(x), rounds=3))
    f, s = statistics.median(results["fused"]), statistics.median(results["per-tensor"])
    print("\n## Dense head forward, 16 Linear(64, 64) layers (32 tensors), CPU, 1 thread\n")
    print("| head | forward (ms) | ratio |\n| --- | --- | --- |")
    print(f"| fused (one matrix) | {1e3 * f:.3f} | 1.00 |")
    print(f"| one Linear per tensor | {1e3 * s:.3f} | {s / f:.2f} |")


def compiled() -> None:
    torch.manual_seed(0)
    downstream = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.LayerNorm(64))
    x = torch.randn(64, 16)
    rows = []
    for head in ("film", "dense", "chunked", "lowrank", "lora", "auto", "auto:none"):
        name, _, base = head.partition(":")
        hyper = HyperNetwork(16, [32, 64], downstream, head=name, base=base or "learned")
        with torch.no_grad():  # as after training: the update depends on the input
            for p in hyper.head.parameters():
                p.add_(0.3 * torch.randn_like(p))
        twin = copy.deepcopy(hyper)
        fn = torch.compile(twin, fullgraph=True)
        start = time.perf_counter()
        out = fn(x)
        first = time.perf_counter() - start
        ref = hyper(x)
        err = max((out[k] - ref[k]).abs().max().item() for k in ref)
        if base != "none":  # the running mean moved alike
            err = max(err, (twin.center - hyper.center).abs().max().item())
        eager = median_time(lambda h=hyper: h(x))
        fast = median_time(lambda f=fn: f(x))
        rows.append((head, first, err, eager, fast))
    print("\n## torch.compile(hypernetwork, fullgraph=True), CPU\n")
    print("| head | compile (s) | max abs diff vs eager | eager (ms) | compiled (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for head, first, err, eager, fast in rows:
        print(f"| {head} | {first:.1f} | {err:.2e} | {1e3 * eager:.3f} | {1e3 * fast:.3f} |")
        if err > 1e-5:
            raise SystemExit(f"compiled {head} hypernetwork differs from eager by {err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_scale()
    fused_vs_per_tensor()
    if not args.no_compile:
        compiled()


if __name__ == "__main__":
    main()
