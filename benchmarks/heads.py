"""Heads against training the downstream directly: step time, size, peak memory and quality.

Every hypernetwork is the seed constructor ``HyperNetwork(input_dim, [32, 64, 96], downstream,
head=..., base=...)`` trained with Adam(lr=1e-3) on a set-conditioned task: the hypernetwork
reads a batch of 128 (x, y) pairs of one task (mean pooling) and the downstream's loss is taken
on the same batch; "direct" trains the downstream's own weights with the same optimizer on the
same batches.

Task (the data set decides the best weights): x ~ N(0, I), y = s * (W x) + b with W a fixed random
map shared by all tasks and, per task, s ~ U(0.5, 1.5)^out and b ~ N(0, I). Direct training cannot
see the task: its best loss is about 1.08. Held-out loss: fresh tasks, the hypernetwork reads 128
pairs, the loss is taken on 512 other inputs of the same task.

    python benchmarks/heads.py --quick          # a few minutes on 2 shared CPU cores
    python benchmarks/heads.py                  # the full run (tens of minutes)

A variant is a head name on the default learned base (``auto`` is the seed constructor's
default), ``NAME:none`` for the same head with ``base="none"`` (``auto:none`` was the default
before the learned base), ``fixed``: a parameter-free head, the cost of everything else, or
``NAME:learned:unchecked``: the head without the checks of each call (the downstream changed
since construction, non-finite embeddings), to measure what they cost.
Set ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=134217728`` to time with glibc's
thresholds fixed (see ``docs/results/heads.md``).

Peak memory: each variant runs in a fresh subprocess (Linux): after imports, data and the
downstream are built, we reset the process's peak resident set size (``/proc/self/clear_refs``),
build the variant, run a few training steps, and report the peak (``VmHWM``) minus the resident
size before: the memory the variant's model, optimizer state and activations add at their peak.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time

import torch
from record import header, reset_peak, resident_mb  # benchmarks/record.py
from torch import Tensor, nn
from torch.func import functional_call

from torchhyper import HyperNetwork
from torchhyper.heads import HEADS as NAMED_HEADS
from torchhyper.heads import Head, LoRAHead

HIDDEN = [32, 64, 96]
BATCH = 128
MLPS = {
    "mlp-269k": [784, 256, 256, 10],
    "mlp-1m": [784, 1024, 256, 10],
    "mlp-5m": [784, 2048, 1536, 10],
    # The peer comparison's sizes: 1.0 M and 5.0 M parameters from 16 inputs to 1 output.
    "mlp-16-991": [16, 991, 991, 1],
    "mlp-16-2227": [16, 2227, 2227, 1],
}


class FixedHead(Head):
    """No parameters: a fixed random output that still depends (with weight 0) on the
    embedding, so that the encoder's backward runs. Measures the cost of everything but the
    head: encoder, pooling, norm, assembly, and functional_call."""

    def __init__(self, in_features: int, shapes) -> None:
        super().__init__(in_features, shapes)
        self.register_buffer("values", torch.randn(self.numel))

    def forward(self, z: Tensor) -> Tensor:
        return self.values + 0.0 * z.sum(-1, keepdim=True)


HEADS = {
    "fixed": FixedHead,
    **{name: name for name in NAMED_HEADS},
    "auto": "auto",
    "lora-r4": functools.partial(LoRAHead, rank=4),
    "lora-r16": functools.partial(LoRAHead, rank=16),
}


def head_and_base(variant: str):
    name, _, base = variant.partition(":")
    return HEADS[name], base.partition(":")[0] or "learned"


# The dense head of the 5 M MLP and of the UNet needs 7.8 GB and 17 GB with Adam: skipped.
DENSE_MAX_BYTES = 3e9


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def unet() -> nn.Module:
    """The size of the original torchhyper's MNIST DDPM (configs/hypernet_mnist_ddpm.json:
    block channels 64,128,192, 2 layers per block, attention head dim 8); its block types are
    not in that config, so we take diffusers' usual (Down, AttnDown, AttnDown): 10.7 M
    parameters."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(64, 128, 192),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )


class Variant:
    """One way to train the downstream: directly, or through a hypernetwork with a given head."""

    def __init__(self, name: str, downstream: nn.Module, make_batch) -> None:
        self.name = name
        self.downstream = downstream
        self.make_batch = make_batch
        if name == "direct":
            self.trained = downstream
        else:
            downstream.requires_grad_(False)
            features = make_batch()[2].shape[1]
            head, base = head_and_base(name)
            self.hyper = HyperNetwork(features, HIDDEN, downstream, head=head, base=base)
            self.hyper._guard = not name.endswith(":unchecked")
            self.trained = self.hyper
        self.optimizer = torch.optim.Adam(self.trained.parameters(), lr=1e-3)

    def params(self) -> int:
        return sum(p.numel() for p in self.trained.parameters())

    def predict(self, inputs: tuple, context: Tensor, query: tuple) -> Tensor:
        if self.name == "direct":
            return self.downstream(*query)
        return functional_call(self.downstream, self.hyper(context), query)

    def step(self, batch) -> float:
        inputs, target, context = batch
        self.optimizer.zero_grad(set_to_none=True)
        out = self.predict(inputs, context, inputs)
        out = out.sample if hasattr(out, "sample") else out
        loss = (out - target).square().mean()
        loss.backward()
        self.optimizer.step()
        return loss.item()


class Tasks:
    """y = s * (W x) + b, with W shared and (s, b) drawn per task."""

    def __init__(self, d_in: int, d_out: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        self.d_in, self.d_out = d_in, d_out

    def sample(self, g: torch.Generator, support: int = BATCH, query: int = 512):
        s = torch.rand(self.d_out, generator=g) + 0.5
        b = torch.randn(self.d_out, generator=g)

        def draw(n: int):
            x = torch.randn(n, self.d_in, generator=g)
            return x, (x @ self.weight.T) * s + b

        x, y = draw(support)
        xq, yq = draw(query)
        return (x,), y, torch.cat([x, y], dim=1), (xq,), yq


def build(name: str, batch: int):
    """(downstream factory, batch maker) for a downstream name."""
    if name in MLPS:
        sizes = MLPS[name]
        tasks = Tasks(sizes[0], sizes[-1])
        g = torch.Generator().manual_seed(1)

        def make_batch():
            inputs, y, context, _, _ = tasks.sample(g, support=batch, query=1)
            return inputs, y, context

        return (lambda: mlp(sizes)), make_batch
    if name == "unet":
        g = torch.Generator().manual_seed(1)

        def make_batch():
            x = torch.randn(batch, 1, 28, 28, generator=g)
            t = torch.randint(0, 1000, (batch,), generator=g)
            noise = torch.randn(batch, 1, 28, 28, generator=g)
            # A denoising-style target; the hypernetwork reads the set of noisy images.
            return (x, t), noise, x.flatten(1)

        return unet, make_batch
    raise ValueError(f"unknown downstream {name!r}")


def fits(name: str, numel: int) -> bool:
    return not name.startswith("dense") or (HIDDEN[-1] + 1) * numel * 16 <= DENSE_MAX_BYTES


def timing(ds_name: str, heads: list[str], rounds: int, steps: int, batch: int):
    factory, make_batch = build(ds_name, batch)
    torch.manual_seed(0)
    numel = sum(p.numel() for p in factory().parameters())
    variants = [Variant("direct", factory(), make_batch)]
    variants += [Variant(h, factory(), make_batch) for h in heads if fits(h, numel)]
    data = [make_batch() for _ in range(steps)]
    for v in variants:  # warm up
        v.step(data[0])
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(rounds):  # interleaved rounds
        for v in variants:
            start = time.perf_counter()
            for b in data:
                v.step(b)
            times[v.name].append((time.perf_counter() - start) / steps)
    direct = times["direct"]
    rows = {}
    for v in variants:
        ratios = [t / d for t, d in zip(times[v.name], direct)]
        rows[v.name] = {
            "ms": 1e3 * statistics.median(times[v.name]),
            "ratio": statistics.median(ratios),
            "params": v.params() / numel,
            "head": sum(p.numel() for p in v.hyper.head.parameters()) if v.name != "direct" else 0,
            "repr": _describe_head(v.hyper.head) if v.name != "direct" else "-",
        }
    for v in variants:  # the checks of each call alone, timed by themselves
        if v.name != "direct" and not v.name.endswith(":unchecked"):
            rows[v.name]["checks_us"] = 1e6 * _checks_alone(v, data[0])
    for name in times:  # what the checks of each call cost: paired with the same head unchecked
        checked = name.removesuffix(":unchecked").removesuffix(":learned")
        if name.endswith(":unchecked") and checked in times:
            paired = [a / b for a, b in zip(times[checked], times[name])]
            rows[checked]["checks"] = statistics.median(paired) - 1
    return numel, rows


def _checks_alone(v: Variant, batch, calls: int = 2000) -> float:
    """Seconds per call of the checks a call makes besides its work: the downstream against
    its record, and whether the embeddings are finite."""
    from torchhyper._drift import _check

    z = v.hyper.norm(v.hyper.embed(batch[2])).detach()
    device = v.hyper.gain.device

    def checks() -> None:
        _check(v.hyper._watch, device)
        bool(torch.isfinite(z).all())

    checks()
    start = time.perf_counter()
    for _ in range(calls):
        checks()
    return (time.perf_counter() - start) / calls


def _describe_head(head: nn.Module) -> str:
    rank = getattr(head, "rank", None)
    return type(head).__name__ + (f" r={rank}" if rank is not None else "")


def memory_child(ds_name: str, head: str, batch: int, steps: int) -> None:
    factory, make_batch = build(ds_name, batch)
    data = [make_batch() for _ in range(steps)]
    torch.manual_seed(0)
    downstream = factory()
    before = reset_peak()
    v = Variant(head, downstream, make_batch)
    for b in data:
        v.step(b)
    print(json.dumps({"before_mb": before, "peak_mb": resident_mb("VmHWM")}))


def memory(ds_name: str, heads: list[str], batch: int, steps: int, numel: int):
    rows = {}
    for head in ["direct", *heads]:
        if not fits(head, numel):
            continue
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                ds_name,
                head,
                f"--batch={batch}",
                f"--memory-steps={steps}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows[head] = r["peak_mb"] - r["before_mb"]
    return rows


def quality(ds_name: str, heads: list[str], steps: int, eval_tasks: int):
    sizes = MLPS[ds_name]
    tasks = Tasks(sizes[0], sizes[-1])
    numel = sum(p.numel() for p in mlp(sizes).parameters())
    rows = {}
    for head in ["direct", *heads]:
        if not fits(head, numel):
            continue
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)

        def make_batch(g=g):
            inputs, y, context, _, _ = tasks.sample(g, query=1)
            return inputs, y, context

        v = Variant(head, mlp(sizes), make_batch)
        start = time.perf_counter()
        for _ in range(steps):
            v.step(make_batch())
        seconds = time.perf_counter() - start
        held = torch.Generator().manual_seed(12345)
        losses = []
        with torch.no_grad():
            for _ in range(eval_tasks):
                inputs, _, context, query, yq = tasks.sample(held)
                losses.append((v.predict(inputs, context, query) - yq).square().mean().item())
        rows[head] = {"loss": statistics.mean(losses), "seconds": seconds}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--downstreams", default="mlp-269k,mlp-1m,mlp-5m,unet")
    parser.add_argument(
        "--heads", default="auto,film,dense,lora,chunked,lowrank,no_update,auto:none,dense:none"
    )
    parser.add_argument("--parts", default="time,memory,quality")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--memory-child", nargs=2, metavar=("DOWNSTREAM", "HEAD"))
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, help="timing: interleaved rounds (3 quick, 7 full)")
    parser.add_argument(
        "--train-steps", type=int, help="quality: training steps (300 quick, 1000 full)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        memory_child(*args.memory_child, args.batch, args.memory_steps)
        return
    heads = args.heads.split(",")
    parts = args.parts.split(",")
    rounds, steps, train_steps = (3, 3, 300) if args.quick else (7, 5, 1000)
    rounds = args.rounds or rounds
    train_steps = args.train_steps or train_steps
    print(f"# Heads vs direct training (CPU, 1 thread, {'quick' if args.quick else 'full'})\n")
    print(header())
    for ds_name in args.downstreams.split(","):
        big = ds_name == "unet"
        batch = 16 if big and args.quick else args.batch
        r, s = (2, 1) if big else (rounds, steps)
        numel, rows = timing(ds_name, heads, r, s, batch)
        print(f"## {ds_name}: {numel:,} parameters, batch {batch}\n")
        mem = memory(ds_name, heads, batch, 1 if big else 3, numel) if "memory" in parts else {}
        qual = quality(ds_name, heads, train_steps, 32) if "quality" in parts and not big else {}
        print(
            "| variant | head | step (ms) | step / direct | params / downstream | head params "
            "| peak mem (MB) | mem / direct | held-out loss | loss / dense (base none) "
            "| loss / direct |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, row in rows.items():
            m = mem.get(name)
            q = qual.get(name, {}).get("loss")
            qd = qual.get("dense:none", qual.get("dense", {})).get("loss")
            qdir = qual.get("direct", {}).get("loss")
            cells = [
                name,
                row["repr"],
                f"{row['ms']:.1f}",
                f"{row['ratio']:.2f}",
                f"{row['params']:.3g}" if name != "direct" else "1",
                f"{row['head']:,}" if name != "direct" else "-",
                f"{m:.0f}" if m is not None else "-",
                f"{m / mem['direct']:.2f}" if m is not None and mem.get("direct") else "-",
                f"{q:.3f}" if q is not None else "-",
                f"{q / qd:.2f}" if q is not None and qd else "-",
                f"{q / qdir:.2f}" if q is not None and qdir else "-",
            ]
            print("| " + " | ".join(cells) + " |")
        for name, row in rows.items():
            if "checks_us" in row:
                print(
                    f"\n{name}: the checks of each call take {row['checks_us']:.0f} us by "
                    f"themselves, {row['checks_us'] / (10 * row['ms']):.2f}% of its step."
                )
            if "checks" in row:
                print(
                    f"\nThe checks of each call (downstream drift, non-finite embeddings) cost "
                    f"{100 * row['checks']:+.1f}% of {name}'s step (median over {r} rounds of "
                    f"the paired ratio to {name} unchecked)."
                )
        skipped = [h for h in heads if not fits(h, numel)]
        if skipped:
            print(
                f"\nSkipped (would need over {DENSE_MAX_BYTES / 1e9:.0f} GB with Adam): {skipped}"
            )
        print(flush=True)


if __name__ == "__main__":
    main()
