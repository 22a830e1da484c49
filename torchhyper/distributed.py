r"""Training a hypernetwork on several processes with PyTorch's own engine: torchrun, DDP, FSDP2.

Nothing here replaces PyTorch's machinery; these are the few pieces a hypernetwork adds to it:

* :class:`GlobalMean`, :class:`GlobalSum` and :class:`GlobalMax` pool the set over **all**
  ranks, for ``HyperNetwork(..., pool=GlobalMean())``. By default (``pool="mean"``) each rank
  pools over its own local share of the set. With a global pool, an N-process run equals a
  1-process run on the same global batch.
* :func:`setup` initializes the process group when launched by ``torchrun`` (gloo on the CPU,
  nccl on CUDA) and does nothing in a plain ``python`` run, so one script serves both.
* :func:`wrap` puts the hypernetwork under DDP or FSDP2 (``fully_shard``).
* :func:`full_state_dict` and :func:`load_full_state_dict` give checkpoints that do not depend
  on the number of processes or on the wrapper.

Recipe for your own loop (run with ``torchrun --nproc_per_node=N train.py``, or plain
``python train.py``)::

    import torch
    from torch.func import functional_call
    from torchhyper import HyperNetwork
    from torchhyper.distributed import GlobalMean, full_state_dict, setup, wrap

    process = setup()                        # rank, world_size, device; gloo/nccl under torchrun
    torch.manual_seed(0)                     # the same seed on every rank (FSDP2 needs it)
    downstream = Downstream().to(process.device).requires_grad_(False)  # holds no trainable params
    hypernetwork = HyperNetwork(d, [64, 64], downstream, pool=GlobalMean()).to(process.device)
    model = wrap(hypernetwork, strategy="ddp")   # or "fsdp2" for a hypernetwork too big for one device
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # after wrap

    for step in range(steps):
        x, y = global_batch(step)                            # the same on every rank, or ...
        x, y = x[process.rank :: process.world_size], y[process.rank :: process.world_size]
        params = model(x)                                    # call the wrapper, not its methods
        pred = functional_call(downstream, params, x)        # outside the wrapper
        loss = (pred - y).square().mean()                    # mean over the local share
        optimizer.zero_grad()
        loss.backward()                                      # gradients averaged over ranks
        optimizer.step()
        state = full_state_dict(model, optimizer)            # every rank calls it
        if process.is_main:
            torch.save(state, "checkpoint.pt")               # rank 0 writes

Resuming: every rank builds the model and optimizer as above, then
``load_full_state_dict(model, torch.load("checkpoint.pt", weights_only=True), optimizer)``.
A checkpoint does not depend on the number of processes or on DDP versus FSDP2.

Rules that make it exact:

* The downstream holds no trainable parameters, so only the hypernetwork is wrapped, and
  ``functional_call(downstream, params, ...)`` runs outside the wrapper. Call the wrapper itself
  (``model(x)``), not ``embed``/``generate``/``per_set``: DDP and FSDP2 act in its ``forward``.
  To train ``per_set``, wrap a small module whose ``forward`` calls it.
* Give every rank an equal share of the global batch and average the loss over the local share:
  DDP and FSDP2 average gradients over ranks, so the mean of the ranks' losses is the global mean.
* Seed the data the same on every rank (each then takes its share); seed noise drawn inside the
  loss (VAE samples, diffusion timesteps) differently per rank.
* A global pool is a collective: every rank must call the hypernetwork equally often. It pools
  globally only in training mode; in ``eval()`` mode it pools over the set it is given, like
  :class:`torch.nn.SyncBatchNorm`, so evaluation and plots on rank 0 alone do not hang under
  DDP. Under FSDP2 every call gathers shards, so rank 0 alone cannot call the wrapped model:
  evaluate on every rank, or load ``full_state_dict(model)["model"]`` into an unwrapped copy.
* Downstream buffers (BatchNorm running statistics) are updated per rank and are not synchronized.

Failures: if a rank dies, the others fail in their next collective (or torchrun stops them) and
torchrun reports which rank died; resume from the last checkpoint, by hand or with
``torchrun --max-restarts=N``. :func:`setup` works around a PyTorch bug that makes ranks
restarted by ``--max-restarts`` fail or hang in ``init_process_group``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "GlobalMean",
    "GlobalSum",
    "GlobalMax",
    "Process",
    "setup",
    "cleanup",
    "wrap",
    "full_state_dict",
    "load_full_state_dict",
]


def _active(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllReduceSum(torch.autograd.Function):
    """Sums a tensor over ranks. The backward also sums: the gradient of every rank's loss with
    respect to the global sum reaches every rank's local share. DDP's and FSDP2's averaging of the
    parameters' gradients then gives exactly the gradient of the mean of the ranks' losses."""

    @staticmethod
    def forward(tensor: Tensor, group: Any) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, tensor: Tensor, group: Any) -> tuple[Tensor, Any]:
        # Under torch.vmap (e.g. HyperNetwork.per_set maps a pool over sets): one collective on
        # the whole batch, which every rank holds in the same size.
        return _batched(_AllReduceSum, in_dims[0], tensor, group)


class _AllReduceMax(torch.autograd.Function):
    """Maximum over ranks. The summed gradient goes to the ranks that hold the maximum, split
    evenly when several do (as :func:`torch.amax` splits it among ties)."""

    @staticmethod
    def forward(tensor: Tensor, group: Any) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.group = inputs[1]
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        local, best = ctx.saved_tensors
        holds = (local == best).to(grad.dtype)
        packed = torch.stack([grad, holds]).contiguous()
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
        return packed[0] * holds / packed[1], None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, tensor: Tensor, group: Any) -> tuple[Tensor, Any]:
        return _batched(_AllReduceMax, in_dims[0], tensor, group)


def _batched(function: Any, dim: int | None, tensor: Tensor, group: Any) -> tuple[Tensor, Any]:
    if dim is None:
        return function.apply(tensor, group), None
    return function.apply(tensor.movedim(dim, 0), group), 0


class _GlobalPool(nn.Module):
    def __init__(self, *, group: Any = None) -> None:
        super().__init__()
        self.group = group

    def _global(self, e: Tensor) -> bool:
        if not isinstance(e, Tensor) or e.dim() < 2:
            shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(
                f"{type(self).__name__} expects encodings of shape (*, B, H), got {shape}"
            )
        return self.training and _active(self.group)

    def extra_repr(self) -> str:
        return "" if self.group is None else f"group={self.group}"


class GlobalMean(_GlobalPool):
    r"""Mean of the encodings over a set spread across all ranks: ``(*, B, H) -> (*, H)``.

    Each rank holds ``B_r`` examples of the set. The sums of their encodings and the counts
    ``B_r`` are all-reduced (one collective, differentiable), so every rank gets the mean over
    all ``sum_r B_r`` examples, and gradients reach every rank's examples. Ranks may hold
    different numbers of examples, but the same leading batch ``*`` of sets. Without an
    initialized process group, with one process, or in ``eval()`` mode, it is the local mean,
    like ``pool="mean"``.

    Args:
        group: The process group to pool over; default: all ranks.

    Example:
        >>> hypernetwork = HyperNetwork(d, [64, 64], downstream, pool=GlobalMean())
    """

    @staticmethod
    def local(e: Tensor) -> Tensor:
        r"""The pool of this rank's share alone, ``(*, B, H) -> (*, H)``, e.g. for sets of one."""
        return e.mean(dim=-2)

    def forward(self, e: Tensor) -> Tensor:
        if not self._global(e):
            return self.local(e)
        sums = e.sum(dim=-2)
        count = torch.full((*sums.shape[:-1], 1), e.shape[-2], dtype=e.dtype, device=e.device)
        total = _AllReduceSum.apply(torch.cat([sums, count], dim=-1), self.group)
        return total[..., :-1] / total[..., -1:]


class GlobalSum(_GlobalPool):
    r"""Sum of the encodings over a set spread across all ranks: ``(*, B, H) -> (*, H)``.

    The local sums are all-reduced (differentiable). Without an initialized process group, with
    one process, or in ``eval()`` mode, it is the local sum, like ``pool="sum"``.

    Args:
        group: The process group to pool over; default: all ranks.
    """

    @staticmethod
    def local(e: Tensor) -> Tensor:
        r"""The pool of this rank's share alone, ``(*, B, H) -> (*, H)``, e.g. for sets of one."""
        return e.sum(dim=-2)

    def forward(self, e: Tensor) -> Tensor:
        if not self._global(e):
            return self.local(e)
        return _AllReduceSum.apply(e.sum(dim=-2), self.group)


class GlobalMax(_GlobalPool):
    r"""Feature-wise maximum over a set spread across all ranks: ``(*, B, H) -> (*, H)``.

    The local maxima are all-reduced with ``MAX``; the gradient goes to the rank(s) holding
    each maximum. Without an initialized process group, with one process, or in ``eval()``
    mode, it is the local maximum, like ``pool="max"``.

    Args:
        group: The process group to pool over; default: all ranks.
    """

    @staticmethod
    def local(e: Tensor) -> Tensor:
        r"""The pool of this rank's share alone, ``(*, B, H) -> (*, H)``, e.g. for sets of one."""
        return e.amax(dim=-2)

    def forward(self, e: Tensor) -> Tensor:
        if not self._global(e):
            return self.local(e)
        return _AllReduceMax.apply(e.amax(dim=-2), self.group)


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
    can read the dead ones' addresses and fail or hang (PyTorch issues #135712, #167288; seen
    here with gloo on torch 2.13). Each rank counts its own starts in the store; every rank
    starts once per attempt, so the counts agree and name a fresh prefix.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout or timedelta(minutes=5),
    )
    start = store.add(f"torchhyper/starts/rank{rank}", 1)
    prefixed = dist.PrefixStore(f"torchhyper/start{start}", store)
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
