"""A minimal distributed hypernetwork trainer, run by tests/test_distributed.py.

It follows the recipe of :mod:`torchhyper.distributed` and runs unchanged with one process or
under torchrun:

    python tests/_distributed_worker.py --out=runs/dist1 --pool=global
    torchrun --standalone --nproc_per_node=2 tests/_distributed_worker.py \
        --out=runs/dist2 --pool=global

Each step draws one global set of ``--batch`` points ``(u, y)`` of a random sine wave (the same
on every rank, from a seed and the step), gives each rank an equal share, and trains the
hypernetwork to generate an MLP that fits the wave. Rank 0 logs, and writes a checkpoint
every ``--checkpoint-every`` steps; a run restarts from it. For the tests, every rank writes
``rank{r}.pt`` (its local parameters or shards, and the global losses), and rank 0 writes
``final.pt`` (the full state) and, with ``--check-pools``, ``pool_grads.pt``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from torchhyper import HyperNetwork
from torchhyper.distributed import (
    GlobalMax,
    GlobalMean,
    GlobalSum,
    Process,
    cleanup,
    full_state_dict,
    load_full_state_dict,
    setup,
    wrap,
)

# The generated tensors are views of one flat tensor; functional_call never writes into them.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

POOLS = {
    "mean": lambda: "mean",
    "global": GlobalMean,
    "sum": lambda: "sum",
    "global-sum": GlobalSum,
    "max": lambda: "max",
    "global-max": GlobalMax,
}


class Stopped(Exception):
    """Raised in a rank that torchrun stops (SIGTERM), usually because another rank failed."""


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2", "none"], default="ddp")
    parser.add_argument("--pool", choices=list(POOLS), default="global")
    parser.add_argument("--head", default="dense")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="global set size per step")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument(
        "--kill-rank", type=int, default=None, help="test: this rank SIGKILLs itself"
    )
    parser.add_argument(
        "--kill-at",
        type=int,
        default=None,
        help="test: ... at this step, unless torchrun restarted it",
    )
    parser.add_argument(
        "--check-pools", action="store_true", help="test: save one step's gradients per pool"
    )
    return parser.parse_args()


def global_batch(step: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global set: ``u`` and ``y = a sin(u + phase)``, each ``(size, 1)``."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    amplitude = 0.5 + 1.5 * torch.rand((), generator=gen)
    phase = math.pi * torch.rand((), generator=gen)
    u = 6 * torch.rand(size, 1, generator=gen) - 3
    return u, amplitude * torch.sin(u + phase)


def local_share(process: Process, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """This rank's equal share of the global set (rows ``rank, rank + N, ...``)."""
    return [t[process.rank :: process.world_size] for t in tensors]


def build(
    args: argparse.Namespace, pool: str, process: Process
) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(args.seed)  # the same on every rank: FSDP2 broadcasts nothing
    downstream = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).requires_grad_(False)
    hypernetwork = HyperNetwork(2, [16, 16], downstream, head=args.head, pool=POOLS[pool]())
    model = wrap(hypernetwork.to(process.device), strategy=args.strategy)
    return downstream.to(process.device), hypernetwork, model


def loss_on(
    model: nn.Module, downstream: nn.Module, u: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    params = model(torch.cat([u, y], dim=-1))  # the wrapper: DDP/FSDP2 act in its forward
    pred = functional_call(downstream, params, u)  # outside the wrapper
    return (pred - y).square().mean()  # mean over the local share


def mean_over_ranks(value: torch.Tensor, process: Process) -> float:
    if process.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= process.world_size
    return value.item()


def save_atomically(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace, process: Process, progress: dict) -> None:
    downstream, hypernetwork, model = build(args, args.pool, process)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    checkpoint = args.out / "checkpoint.pt"
    losses: list[float] = []
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        load_full_state_dict(model, state, optimizer)
        start, losses = state["step"], state["losses"]
        if process.is_main:
            print(f"resumed from {checkpoint} at step {start}", flush=True)
    progress["checkpoint"] = (checkpoint, start) if start else None
    for step in range(start, args.steps):
        progress["step"] = step
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if step == args.kill_at and process.rank == args.kill_rank and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        u, y = local_share(process, *global_batch(step, args.batch, args.seed))
        loss = loss_on(model, downstream, u, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(mean_over_ranks(loss.detach(), process))
        if process.is_main:
            print(f"step {step}: loss {losses[-1]:.6f}", flush=True)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            state = full_state_dict(model, optimizer)  # a collective: every rank calls it
            if process.is_main:
                save_atomically({**state, "step": step + 1, "losses": losses}, checkpoint)
                progress["checkpoint"] = (checkpoint, step + 1)

    local = {
        name: (p.to_local() if hasattr(p, "to_local") else p).detach().cpu()
        for name, p in hypernetwork.named_parameters()
    }
    shapes = {name: tuple(p.shape) for name, p in hypernetwork.named_parameters()}
    torch.save(
        {"local": local, "shapes": shapes, "losses": losses}, args.out / f"rank{process.rank}.pt"
    )
    final = full_state_dict(model)
    if process.is_main:
        torch.save(final["model"], args.out / "final.pt")
    if args.check_pools:
        check_pools(args, process)


class PerSet(nn.Module):
    """DDP and FSDP2 act in ``forward``: to train ``per_set``, wrap a module whose forward calls
    it."""

    def __init__(self, hypernetwork: HyperNetwork) -> None:
        super().__init__()
        self.hypernetwork = hypernetwork

    def forward(self, sets: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.hypernetwork.per_set(sets)


def check_pools(args: argparse.Namespace, process: Process) -> None:
    """One step's gradients (averaged over ranks) for each pool, on step 0's global set, and
    for ``per_set`` with a global mean over 3 sets spread across the ranks."""
    grads = {}
    for pool in ("mean", "global-sum", "global-max", "per-set"):
        downstream, hypernetwork, model = build(
            args, "global" if pool == "per-set" else pool, process
        )
        if pool == "per-set":
            model = wrap(PerSet(hypernetwork), strategy=args.strategy)
            gen = torch.Generator().manual_seed(args.seed + 1)
            sets = torch.randn(3, args.batch, 2, generator=gen)[
                :, process.rank :: process.world_size
            ]
            loss = sum(v.square().mean() for v in model(sets).values())  # the same on every rank
        else:
            u, y = local_share(process, *global_batch(0, args.batch, args.seed))
            loss = loss_on(model, downstream, u, y)
        loss.backward()
        full = {
            name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for name, p in hypernetwork.named_parameters()
        }
        grads[pool] = {name: g.detach().cpu() for name, g in full.items()}
    if process.is_main:
        torch.save(grads, args.out / "pool_grads.pt")


def stop_message(process: Process, progress: dict, reason: str) -> str:
    saved = progress.get("checkpoint")
    where = f"{saved[0]} (after step {saved[1]})" if saved else "none yet"
    return (
        f"rank {process.rank}/{process.world_size}: "
        f"training stopped at step {progress.get('step')}: "
        f"{reason}. Last checkpoint: {where}. Run the same command again to resume from it, "
        "or launch with torchrun --max-restarts=N to restart automatically."
    )


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    process = setup()
    args.out.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum: int, frame: object) -> None:
        raise Stopped("stopped by torchrun (SIGTERM), most likely because another rank failed")

    signal.signal(signal.SIGTERM, on_sigterm)
    progress: dict = {}
    try:
        train(args, process, progress)
    except Exception as error:
        # A dead peer shows up as a gloo/nccl error in a collective, or as torchrun's SIGTERM.
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
        print(stop_message(process, progress, reason), file=sys.stderr, flush=True)
        if isinstance(error, Stopped):
            sys.exit(1)
        raise
    cleanup()


if __name__ == "__main__":
    main()
    if "LOCAL_RANK" in os.environ:  # launched by torchrun, and done: the group is destroyed
        # Leave without the interpreter's own teardown. There, gloo's worker threads can still
        # release tensors and abort the process ("terminate called without an active
        # exception", SIGABRT), after a clean destroy_process_group: seen in 2-rank FSDP2 runs
        # here and in CI, about 1 in 50 under load (pytorch/pytorch#179291 describes the cause).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
