r"""Training a hypernetwork on several processes with PyTorch's own engine: torchrun, DDP, FSDP2.

Nothing here replaces PyTorch's machinery; these are the few pieces a hypernetwork adds to it:

* :class:`GlobalMean`, :class:`GlobalSum` and :class:`GlobalMax` (in ``pools.py``) pool the
  set over **all** ranks, for ``HyperNetwork(..., pool=GlobalMean())``. By default
  (``pool="mean"``) each rank pools over its own local share of the set. With a global pool,
  an N-process run equals a 1-process run on the same global batch.
* :func:`setup` (in ``training.py``, with the rest) initializes the process group when launched
  by ``torchrun`` (gloo on the CPU, nccl on CUDA) and does nothing in a plain ``python`` run.
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
    model = wrap(hypernetwork, strategy="ddp")   # or "fsdp2", for one too big for a device
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

from torchhyper.distributed.pools import GlobalMax, GlobalMean, GlobalSum
from torchhyper.distributed.training import (
    Process,
    cleanup,
    full_state_dict,
    load_full_state_dict,
    setup,
    wrap,
)

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
