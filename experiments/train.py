r"""Trains a hypernetwork on one of the registered experiments, beside the same downstream
trained directly, then evaluates both against the ground truth.

    python -m experiments.train RUN [--key=value ...]         # a registered run, e.g. gmm
    python -m experiments.train CONFIG.json [--key=value ...]  # a config file
    python -m experiments.train RUN --print-config            # its config as JSON; no training

``RUN`` is one of ``experiments.experiment.run_names()`` (``gmm``, ``gmm_amortized``, ``flow``,
...), declared in its experiment's module; its run folder defaults to ``runs/RUN``.

Reads top to bottom: config -> run folder checked -> task (data, downstream, evaluation) ->
models -> optimizers -> (resume) -> run folder claimed -> training loop with checkpoints ->
evaluation, plots, metrics -> the run folder's name, printed last.

Which run folder a run may take, and what it holds: :mod:`experiments.runs`; what a checkpoint
holds: :mod:`experiments.checkpoint`; the optimizer: :mod:`experiments.common.fit`; what
changes under torchrun: :mod:`experiments.distributed`.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from experiments.checkpoint import (
    check_config,
    checkpoint_state,
    load_checkpoint,
    restore_state,
    save_checkpoint,
)
from experiments.common.fit import CosineAdam, mean_loss
from experiments.config import Config, config_to_dict, load
from experiments.distributed import (
    barrier,
    init_processes,
    local_share,
    mean_over_ranks,
    report_failure,
    seed_per_rank,
    unsharded,
)
from experiments.experiment import Task, build_task, run_names
from experiments.runs import RESUMABLE, check_out_dir, claim_out_dir, started_only, write_json
from torchhyper import HyperNetwork
from torchhyper.distributed import GlobalMax, GlobalMean, GlobalSum, cleanup, wrap
from torchhyper.heads import HEADS

__all__ = ["train", "main"]

# config.pool -> the pool over every rank's share of a set, for global_pool=true.
GLOBAL_POOLS = {"mean": GlobalMean, "sum": GlobalSum, "max": GlobalMax}


def resolve_device(name: str) -> torch.device:
    r"""The config's device, or a clear error when CUDA is asked for but missing."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config.device is 'cuda' but CUDA is not available; use --device=cpu")
    return torch.device(name)


def conv_encoder(shape: tuple[int, ...], width: int = 32) -> nn.Sequential:
    r"""The per-example encoder of ``encoder="cnn"``: flattened images ``(N, C * H * W)`` of
    ``shape = (C, H, W)``, two 3x3 convolutions, a 2x2 max pool and an average down to 4x4,
    ``-> (N, 32 * width)``."""
    return nn.Sequential(
        nn.Unflatten(1, shape),
        nn.Conv2d(shape[0], width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
    )  # fmt: skip


def build_models(
    config: Config, task: Task, device: torch.device
) -> tuple[HyperNetwork, nn.ModuleList]:
    r"""The hypernetwork, and one directly trained copy of the downstream per training dataset."""
    reduce = GLOBAL_POOLS[config.pool]() if config.global_pool else None  # over every rank's share
    pool: str | nn.Module = config.pool if reduce is None else reduce
    hidden_sizes, encoder = config.hidden_sizes, None
    if config.encoder == "cnn":
        if task.example_shape is None:
            raise ValueError(
                f"config.encoder='cnn' needs image examples, but experiment "
                f"{config.experiment!r} reads vectors of {task.input_dim}; use encoder='mlp'"
            )
        encoder = conv_encoder(task.example_shape)
        hidden_sizes = hidden_sizes[1:]
    options: dict[str, Any] = config.head_options  # e.g. {"rank": 64}
    head = functools.partial(HEADS[config.head], **options) if config.head_options else config.head
    hypernetwork = HyperNetwork(
        task.input_dim,
        hidden_sizes,
        task.downstream,
        head=head,
        base=config.base,  # type: ignore[arg-type]  # a name of BASES (Config.validate)
        pool=pool,
        standardize=config.standardize,
        rho=config.rho,
        encoder=encoder,
    )
    direct = nn.ModuleList()
    for _ in range(task.num_datasets):
        direct.append(copy.deepcopy(task.downstream).requires_grad_(True))
    return hypernetwork.to(device), direct.to(device)


def param_groups(config: Config, hypernetwork: nn.Module) -> list[dict[str, Any]]:
    r"""The hypernetwork's parameters at ``lr``, but for its base (the downstream's values,
    copied), at ``direct_lr``: the rate the downstream trains at directly, as
    ``HyperNetwork``'s docstring advises."""
    inner = getattr(hypernetwork, "module", hypernetwork)  # DDP wraps it
    own = getattr(inner, "base", None)
    base = list(own.parameters()) if isinstance(own, nn.Module) else []
    ids = {id(p) for p in base}
    groups = [
        {"params": [p for p in hypernetwork.parameters() if id(p) not in ids], "lr": config.lr}
    ]
    return groups + [{"params": base, "lr": config.direct_lr}] if base else groups


def build_optimizers(
    config: Config, hypernetwork: nn.Module, direct: nn.ModuleList
) -> dict[str, CosineAdam]:
    r"""A :class:`~experiments.common.fit.CosineAdam` for each model, over ``steps`` (constant
    rates with ``cosine=false``): the hypernetwork's (:func:`param_groups`), and the direct
    copies' at ``direct_lr``."""
    steps, cosine = config.steps, config.cosine
    groups = param_groups(config, hypernetwork)
    optimizers = {"hypernetwork": CosineAdam(groups, lr=config.lr, steps=steps, cosine=cosine)}
    if len(direct):
        optimizers["direct"] = CosineAdam(
            direct.parameters(), lr=config.direct_lr, steps=steps, cosine=cosine
        )
    return optimizers


def train_step(
    config: Config,
    task: Task,
    hypernetwork: nn.Module,  # maybe wrapped (DDP, FSDP2)
    direct: nn.ModuleList,
    optimizers: dict[str, CosineAdam],
    generator: torch.Generator,
) -> dict[str, float]:
    r"""One optimizer step of each model on ``sets_per_step`` sets drawn from the task.

    The hypernetwork reads each set and generates the downstream's parameters for it; the
    direct copy of the set's dataset is trained on the very same set. Under torchrun every rank
    draws the same sets and the hypernetwork trains on this rank's share of each.
    """
    sets = [task.sample(generator) for _ in range(config.sets_per_step)]
    shares = [local_share(batch) for _, batch in sets]
    losses = {
        "hypernetwork": mean_loss([task.loss(hypernetwork(share), share) for share in shares])
    }
    if len(direct):
        losses["direct"] = mean_loss(
            [task.loss(dict(direct[k].named_parameters()), batch) for k, batch in sets]
        )
    return {name: optimizers[name].step(loss).item() for name, loss in losses.items()}


def train(config: Config) -> dict[str, Any]:
    r"""Runs one experiment from its config; returns its metrics (also in
    ``out_dir/metrics.json``)."""
    process = init_processes(
        config, resolve_device(config.device)
    )  # under torchrun: joins the others
    out = check_out_dir(config) if process.is_main else Path(config.out_dir)  # writes nothing
    barrier()
    resolved = config_to_dict(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = process.device
    torch.manual_seed(config.seed)

    task = build_task(config, device)
    hypernetwork, direct = build_models(config, task, device)
    model = wrap(hypernetwork, strategy=config.distributed)  # as is with one process
    if not process.is_main:
        direct = nn.ModuleList()  # the directly trained baseline is rank 0's
    optimizers = build_optimizers(config, hypernetwork, direct)
    seed_per_rank(config, process)
    generator = torch.Generator().manual_seed(config.seed)  # draws the training sets
    history: dict[str, list[float]] = {k: [] for k in optimizers}
    first = 0
    path = out / "checkpoint.pt"
    if config.resume and not path.is_file() and started_only(out):
        # Stopped before its first checkpoint (a torchrun restart, or by hand): start over.
        if process.is_main:
            print(f"no checkpoint in {str(out)!r} yet: the run starts over", file=sys.stderr)
    elif config.resume:
        checkpoint = load_checkpoint(path, map_location=device)
        check_config(checkpoint, path, resolved, RESUMABLE)
        try:
            first, history = restore_state(checkpoint, model, direct, optimizers, generator)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"checkpoint {str(path)!r} does not fit this run's models (written by another "
                f"version or architecture?); start a new run in a new out_dir. {error}"
            ) from error
    if process.is_main:
        claim_out_dir(config)  # the run has started: its folder and config.json
    barrier()

    bar = tqdm(
        range(first, config.steps),
        initial=first,
        total=config.steps,
        desc=config.experiment,
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not process.is_main,
    )
    with report_failure(out / "checkpoint.pt"):
        for step in bar:
            losses = train_step(config, task, model, direct, optimizers, generator)
            losses["hypernetwork"] = mean_over_ranks(losses["hypernetwork"])
            for k, v in losses.items():
                history[k].append(v)
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                state = checkpoint_state(
                    step + 1, model, direct, optimizers, history, generator, config=resolved
                )
                if process.is_main:
                    save_checkpoint(out / "checkpoint.pt", state)
    bar.close()

    evaluated = unsharded(model, hypernetwork, lambda: build_models(config, task, device)[0])
    # Free the wrapped model (DDP and FSDP2 hold the process group and its gloo threads) while
    # the interpreter is alive: left to the interpreter's exit, a rank can abort with
    # "terminate called without an active exception" (seen once in CI on a 2-rank FSDP2 run).
    del model, hypernetwork, optimizers
    gc.collect()
    cleanup()
    if not process.is_main:
        return {}  # evaluation, plots and metrics are rank 0's
    assert evaluated is not None  # rank 0's
    torch.manual_seed(config.seed + 1)  # evaluation draws the same numbers, resumed or not
    evaluated.eval()
    metrics = task.finish(evaluated, direct, history, out)
    metrics = {
        "experiment": config.experiment,
        "amortized": config.amortized,
        "steps": config.steps,
        **metrics,
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    r"""The command: trains the config of ``RUN`` or ``CONFIG.json`` with ``--key=value``
    overrides, prints its metrics and then its run folder's name and files, and returns the
    metrics; with ``--print-config``, prints the resolved config as JSON (a config file
    :func:`~experiments.config.load_config` reads back) and returns it."""
    args = sys.argv[1:] if argv is None else list(argv)
    print_config = "--print-config" in args
    args = [a for a in args if a != "--print-config"]
    if not args or args[0].startswith("--"):
        raise SystemExit(
            "usage: python -m experiments.train RUN|CONFIG.json [--key=value ...] "
            "[--print-config]\n"
            f"RUN: one of {run_names()}"
        )
    config = load(args[0], args[1:])
    if print_config:
        resolved = config_to_dict(config)
        print(json.dumps(resolved, indent=2))
        return resolved
    metrics = train(config)
    if metrics:  # rank 0's (other ranks return none)
        shown = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
        print(json.dumps(shown, indent=2))
        files = ", ".join(sorted(p.name for p in Path(config.out_dir).iterdir()))
        print(f"run folder: {config.out_dir} ({files})", flush=True)
    return metrics


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
