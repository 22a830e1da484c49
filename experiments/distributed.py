r"""The experiments' trainer on several processes: torchrun with DDP or FSDP2, gloo on the CPU,
nccl on CUDA. The same command with plain ``python`` trains on one process, as before.

    torchrun --standalone --nproc_per_node=2 -m experiments.train gmm \
        --out_dir=runs/gmm2 --distributed=ddp --global_pool=true

What changes with N processes (``config.distributed`` picks ``"ddp"`` or ``"fsdp2"``):

* Every rank draws the same sets (one data generator, one seed) and trains the hypernetwork on
  its share of each set's examples, rows ``rank, rank + N, ...`` (``batch_size`` stays the
  global set size). DDP or FSDP2 averages the gradients.
* ``global_pool=true`` pools each set over all ranks (``torchhyper.distributed``'s global
  pools, picked in ``train.py``), so the run equals a 1-process run on the same sets. By
  default each rank pools over its own share.
* Noise drawn inside losses (VAE samples, diffusion timesteps) comes from a per-rank seed; every
  rank's RNG state goes into the checkpoint, so a resumed run continues exactly.
* The directly trained baseline, the progress bar, checkpoints, evaluation, plots and metrics
  are rank 0's. Under FSDP2, rank 0 evaluates an unsharded copy of the hypernetwork.
* If a rank dies, the others stop with a message naming the last checkpoint. When torchrun
  restarts the workers (``--max-restarts``), the run resumes from that checkpoint by itself.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchhyper.distributed import Process, full_state_dict, setup

if TYPE_CHECKING:
    from experiments.config import Config

__all__ = [
    "init_processes",
    "local_share",
    "mean_over_ranks",
    "seed_per_rank",
    "rank_rng_states",
    "set_rank_rng_state",
    "unsharded",
    "barrier",
    "report_failure",
]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_processes(config: Config, device: torch.device) -> Process:
    r"""Joins the process group when launched by torchrun (else rank 0 of 1), and turns on
    ``config.resume`` when torchrun restarted the workers and a checkpoint exists.

    Raises:
        ValueError: ``config.batch_size`` is not divisible by the number of processes.
    """
    process = setup(device=device)
    if config.batch_size % process.world_size:
        raise ValueError(
            f"config.batch_size ({config.batch_size}) must be divisible by the number of processes "
            f"({process.world_size}), so that every rank trains on an equal share of each set"
        )
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and (Path(config.out_dir) / "checkpoint.pt").is_file():
        config.resume = True
    return process


def local_share(batch: Tensor) -> Tensor:
    r"""This rank's share of a set ``(B, *)``: rows ``rank, rank + N, ...``; all of it alone."""
    rank, world_size = _world()
    return batch if world_size == 1 else batch[rank::world_size]


def mean_over_ranks(value: float) -> float:
    r"""The mean of a number over ranks (e.g. the loss, for the history)."""
    rank, world_size = _world()
    if world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return total.item() / world_size


def seed_per_rank(config: Config, process: Process) -> None:
    r"""Reseeds the global RNG of ranks > 0 (after the models are built alike on every rank), so
    that noise drawn inside losses differs between ranks. Rank 0 keeps the 1-process stream."""
    if process.rank:
        torch.manual_seed(config.seed + 1_000_003 * process.rank)


def rank_rng_states() -> list[Tensor]:
    r"""Every rank's global CPU RNG state, in rank order; a collective."""
    state = torch.get_rng_state()
    _, world_size = _world()
    if world_size == 1:
        return [state]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def set_rank_rng_state(checkpoint: dict[str, Any]) -> None:
    r"""Restores this rank's RNG state from :func:`rank_rng_states` in a checkpoint, when it was
    saved with as many ranks; else every rank keeps the state of rank 0 already restored."""
    rank, world_size = _world()
    states = checkpoint.get("rng_ranks")
    if states is not None and len(states) == world_size:
        torch.set_rng_state(states[rank])


def unsharded(
    model: nn.Module, hypernetwork: nn.Module, build: Callable[[], nn.Module]
) -> nn.Module | None:
    r"""The hypernetwork to evaluate on rank 0; a collective under FSDP2.

    Under DDP (or one process) it is ``hypernetwork`` itself. FSDP2 gathers shards in every
    forward, which rank 0 alone cannot do: rank 0 gets a fresh, unwrapped copy from ``build()``
    with the full state loaded. Other ranks get ``None``.
    """
    rank, world_size = _world()
    if model is hypernetwork and world_size > 1:  # FSDP2 works in place
        state = full_state_dict(model)["model"]
        if rank:
            return None
        copy = build()
        copy.load_state_dict(state)
        return copy
    return hypernetwork if rank == 0 else None


def barrier() -> None:
    r"""Waits for every rank (no-op alone)."""
    if _world()[1] > 1:
        dist.barrier()


class _Stopped(Exception):
    pass


@contextmanager
def report_failure(checkpoint: Path) -> Iterator[None]:
    r"""In a multi-process run, turns a failure (a collective that lost a dead rank, or
    torchrun's SIGTERM) into one clear line naming the last checkpoint and how to resume."""
    rank, world_size = _world()
    if world_size == 1:
        yield
        return

    def on_sigterm(signum: int, frame: object) -> None:
        raise _Stopped("stopped by torchrun (SIGTERM), most likely because another rank failed")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except Exception as error:
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
        step = "none yet"
        if checkpoint.is_file():
            try:
                saved = torch.load(checkpoint, weights_only=True, mmap=True)["step"]
                step = f"{checkpoint} (after step {saved})"
            except Exception:  # noqa: BLE001 - a half-written file: name it all the same
                step = str(checkpoint)
        print(
            f"rank {rank}/{world_size}: training stopped: {reason}. Last checkpoint: {step}. "
            "Resume with the same command plus --resume=true, or launch with torchrun "
            "--max-restarts=N to resume automatically.",
            file=sys.stderr,
            flush=True,
        )
        if isinstance(error, _Stopped):
            raise SystemExit(1) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
