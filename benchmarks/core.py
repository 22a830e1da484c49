"""Core checks that do not belong in unit tests: init scale on a deep MLP, a fused head against
one Linear per tensor, torch.compile(fullgraph=True) on the core path (training mode, with
the running mean of the embeddings updated in the compiled graph), and the cost of building a
hypernetwork for a large downstream.

    python benchmarks/core.py            # a few minutes on 2 CPU cores
    python benchmarks/core.py --no-compile
    python benchmarks/core.py --only construction --baseline /tmp/before   # before / after

Construction: each measurement runs in a fresh subprocess (Linux). It builds the downstream
(GPT-2 124 M from ``GPT2Config()``, never downloaded; a module of 10,000 two-value tensors),
returns freed memory to the system (``malloc_trim``), resets the peak resident set size
(``/proc/self/clear_refs``), builds ``HyperNetwork(8, [32], downstream, base=...)`` and reports
its wall time and the peak (``VmHWM``) minus the resident size before: the memory that building
adds at its peak, which tracemalloc cannot see (torch allocates outside Python). ``--baseline``
takes a directory that holds another version's ``torchhyper`` package (``git archive HEAD
torchhyper | tar -x -C /tmp/before``); both run interleaved, round by round, medians of
``--rounds``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from record import header, reset_peak, resident_mb  # benchmarks/record.py
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


class TwoValueTensors(nn.Module):
    """5,000 ``Linear(1, 2)``: 10,000 two-value tensors, each with a PyTorch reset."""

    def __init__(self, layers: int = 5000) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(1, 2) for _ in range(layers))


def _gpt2_124m() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config())


DOWNSTREAMS = {"gpt2-124m": _gpt2_124m, "10k-two-value": TwoValueTensors}


def construction_child(downstream_name: str, base: str) -> None:
    torch.manual_seed(0)
    downstream = DOWNSTREAMS[downstream_name]()
    size = sum(p.numel() * p.element_size() for p in downstream.parameters())
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    HyperNetwork(8, [32], downstream, base=base)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = int((resident_mb("VmHWM") - before) * 2**20)  # bytes
    print(json.dumps({"seconds": seconds, "cpu": cpu, "extra": extra, "size": size}))


def construction(baseline: str | None, rounds: int) -> None:
    versions = {"this": None} if baseline is None else {"before": baseline, "this": None}
    cases = [(d, b) for d in DOWNSTREAMS for b in ("learned", "none")]
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for _ in range(rounds):  # interleaved: every version and case once per round
        for version, path in versions.items():
            for d, b in cases:
                env = dict(os.environ)
                if path is not None:
                    env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
                out = subprocess.run(
                    [sys.executable, __file__, "--construction-child", d, b],
                    capture_output=True, text=True, check=True, env=env,
                )  # fmt: skip
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((version, d, b), []).append(result)
    threads = torch.get_num_threads()
    print(f"\n## Building HyperNetwork(8, [32], downstream), CPU, {threads} threads\n")
    print(
        f"Medians of {rounds} interleaved rounds, each in a fresh process. CPU time is the "
        "process's, all threads (wall time rises with other load on the machine; CPU time less)."
        "\n"
    )
    print("| downstream | base | version | wall (s) | CPU (s) | extra peak memory | / model size |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d, b in cases:
        for version in versions:
            runs = results[(version, d, b)]
            seconds = statistics.median(r["seconds"] for r in runs)
            cpu = statistics.median(r["cpu"] for r in runs)
            extra = statistics.median(r["extra"] for r in runs)
            size = runs[0]["size"]
            ratio = f"{extra / size:.2f}x" if size >= 2**20 else "-"  # a tiny module: moot
            print(
                f"| {d} ({size / 2**20:,.1f} MiB) | {b} | {version} | {seconds:.2f} | {cpu:.2f} "
                f"| {extra / 2**20:,.0f} MiB | {ratio} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only", choices=["construction"], default=None)
    parser.add_argument("--baseline", default=None, help="a directory with another torchhyper")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--construction-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.construction_child:
        construction_child(*args.construction_child)
        return
    print("# benchmarks/core.py\n")
    print(header())
    if args.only is None:
        torch.set_num_threads(1)
        init_scale()
        fused_vs_per_tensor()
        if not args.no_compile:
            compiled()
        torch.set_num_threads(os.cpu_count() or 1)
    construction(args.baseline, args.rounds)


if __name__ == "__main__":
    main()
