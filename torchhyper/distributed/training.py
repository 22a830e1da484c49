r"""Launching, wrapping and checkpointing: what a hypernetwork needs from torchrun, DDP and FSDP2.

See :mod:`torchhyper.distributed` for the recipe and the rules that make a run exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Process",
    "setup",
    "cleanup",
    "wrap",
    "full_state_dict",
    "load_full_state_dict",
]


@dataclass(frozen=True)
class Process:
    r"""Where this process stands: its ``rank`` among ``world_size`` processes, its
    ``local_rank`` on its machine, and the ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that logs, plots and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group with more than one process is running."""
        return self.world_size > 1


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _fresh_store(timeout: timedelta | None) -> dict[str, Any]:
    """The store of torchrun's agent, under a prefix that is new each time the ranks start.

    torchrun shares its rendezvous store with the workers, and the keys of the previous
    attempt's process group stay in it, so after a restart (``--max-restarts``) the new ranks
    can read the dead ones' addresses and fail or hang (PyTorch issues #135712, #167288). Each
    rank counts its own starts in the store; every rank starts once per attempt, so the counts
    agree and name a fresh prefix.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(  # type: ignore[attr-defined]
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout or timedelta(minutes=5),
    )
    start = store.add(f"torchhyper/starts/rank{rank}", 1)
    prefixed = dist.PrefixStore(f"torchhyper/start{start}", store)  # type: ignore[attr-defined]
    return {"store": prefixed, "rank": rank, "world_size": world_size}


def setup(
    *,
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout: timedelta | None = None,
) -> Process:
    r"""Initializes the default process group when launched by ``torchrun``, else does nothing.

    Under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
    variables), the device defaults to ``cuda:LOCAL_RANK`` when CUDA is available, else the
    CPU, and the backend to nccl on CUDA, gloo on the CPU. In a plain ``python`` run it returns
    rank 0 of 1. Calling it again returns the same answer.

    Args:
        device: The device to compute on; default as above.
        backend: The process group backend; default as above.
        timeout: How long a collective waits for the other ranks before failing; default:
            PyTorch's (10 minutes for nccl, 30 for gloo).

    Returns:
        The :class:`Process`: rank, world size, local rank and device.

    Raises:
        ValueError: ``device`` is CUDA but CUDA is not available, or ``backend`` is unknown.
    """
    launched = _launched()
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    if device is None:
        device = (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device is {device} but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not launched and not dist.is_initialized():
        return Process(rank=0, world_size=1, local_rank=0, device=device)
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend not in ("gloo", "nccl", "mpi", "xccl", "ucc"):
            raise ValueError(f"backend must be one of gloo, nccl, mpi, xccl, ucc; got {backend!r}")
        kwargs: dict[str, Any] = {"backend": backend}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if device.type == "cuda":
            kwargs["device_id"] = device
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            kwargs.update(_fresh_store(timeout))
        dist.init_process_group(**kwargs)
    return Process(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device
    )


def cleanup() -> None:
    r"""Destroys the default process group, if any (call it at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        # All ranks reach the teardown before any tears down: with gloo, a rank whose peer has
        # already closed its connections can abort at exit ("terminate called ...").
        dist.barrier()
        dist.destroy_process_group()


def wrap(
    hypernetwork: nn.Module,
    *,
    strategy: Literal["ddp", "fsdp2", "none"] = "ddp",
    shard: list[str] | None = None,
) -> nn.Module:
    r"""Puts the hypernetwork under DDP or FSDP2 for training on all ranks.

    Move the hypernetwork to its device first, and build the optimizer from the returned
    module's parameters afterwards. Without an initialized process group (a plain ``python``
    run) the hypernetwork is returned as is.

    * ``"ddp"``: :class:`~torch.nn.parallel.DistributedDataParallel`. Every rank holds all
      parameters; rank 0's are broadcast at construction; gradients are averaged.
    * ``"fsdp2"``: :func:`torch.distributed.fsdp.fully_shard` on a 1-D device mesh over all
      ranks, first on each submodule named in ``shard`` (default: ``["head"]``, the largest part
      of a hypernetwork, e.g. a dense head on a big downstream), then on the whole. Each rank
      holds a 1/N shard of every parameter (as a ``DTensor``); parameters are gathered for the
      forward and gradients reduce-scattered (averaged) in the backward. Modifies
      ``hypernetwork`` in place and returns it. Nothing is broadcast: seed every rank
      identically before building the hypernetwork.
    * ``"none"``: returned as is; each rank trains on its own.

    Args:
        hypernetwork: The module to train; the downstream stays outside.
        strategy: ``"ddp"``, ``"fsdp2"`` or ``"none"``.
        shard: For FSDP2, names of submodules to shard as separate units.

    Returns:
        The module to call and to take parameters from.

    Raises:
        ValueError: Unknown ``strategy``, or a name in ``shard`` that is not a submodule.
    """
    if strategy not in ("ddp", "fsdp2", "none"):
        raise ValueError(f"strategy must be 'ddp', 'fsdp2' or 'none', got {strategy!r}")
    names = ["head"] if shard is None else list(shard)
    if strategy == "fsdp2":
        modules = dict(hypernetwork.named_modules())
        unknown = [n for n in names if n not in modules or n == ""]
        if unknown:
            raise ValueError(
                f"shard must name submodules of the hypernetwork: unknown {unknown}; "
                f"submodules are {[n for n in modules if n][:12]}"
            )
    if strategy == "none" or not (dist.is_available() and dist.is_initialized()):
        return hypernetwork
    device = next(hypernetwork.parameters()).device
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(hypernetwork, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for name in names:
        fully_shard(hypernetwork.get_submodule(name), mesh=mesh)
    fully_shard(hypernetwork, mesh=mesh)
    return hypernetwork


def full_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    r"""The complete, unsharded state of ``model`` (and ``optimizer``), on the CPU, for rank 0.

    Works the same for a plain module, DDP (no ``module.`` prefix) and FSDP2 (shards gathered),
    so a checkpoint loads into any of them with any number of processes. A collective: every
    rank must call it. Under a process group only rank 0 receives the state (the other ranks'
    dicts are empty), so rank 0 saves it.

    Returns:
        ``{"model": state_dict}``, plus ``"optimizer"`` when one is given.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizers = [] if optimizer is None else [optimizer]
    model_state, optimizer_state = get_state_dict(model, optimizers, options=options)
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer_state
    return state


def load_full_state_dict(
    model: nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    from_rank0: bool = False,
) -> None:
    r"""Loads a :func:`full_state_dict` into ``model`` (and ``optimizer``), wrapped or not.

    A collective: every rank calls it. By default every rank passes the same ``state`` (e.g.
    each reads the checkpoint file). With ``from_rank0``, only rank 0's ``state`` is used and
    broadcast, and the other ranks may pass ``{}``: for machines without a shared file system.

    Raises:
        ValueError: ``state`` lacks ``"model"``, or lacks ``"optimizer"`` when one is given.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    from_rank0 = from_rank0 and distributed
    if not from_rank0 or dist.get_rank() == 0:
        needed = ["model"] + (["optimizer"] if optimizer is not None else [])
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(
                f"state must be a full_state_dict(...) result: missing keys {missing}, "
                f"got keys {list(state)}"
            )
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state.get("model", {}), options=options)
        return
    set_state_dict(
        model,
        [optimizer],
        model_state_dict=state.get("model", {}),
        optim_state_dict=state.get("optimizer", {}),
        options=options,
    )
