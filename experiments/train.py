r"""Trains a hypernetwork on one of the registered experiments, beside the same downstream
trained directly, then evaluates both against the ground truth.

    python -m experiments.train RUN [--key=value ...]         # a registered run, e.g. gmm
    python -m experiments.train CONFIG.json [--key=value ...]  # a config file
    python -m experiments.train RUN --print-config            # its config as JSON; no training

``RUN`` is one of ``experiments.registry.run_names()`` (``gmm``, ``gmm_amortized``, ``flow``,
...), declared in its experiment's module; its run folder defaults to ``runs/RUN``.

Reads top to bottom: config -> run folder checked -> task (data, downstream, evaluation) ->
models -> optimizers -> (resume) -> run folder claimed -> training loop with checkpoints ->
evaluation, plots, metrics.

The run folder (``out_dir``) gets ``config.json`` (the resolved config, itself a config file),
``checkpoint.pt`` (which records the config too), ``metrics.json`` and PNG plots. A non-empty
``out_dir`` is never reused, except

* with ``--resume=true``, which continues its run exactly where its last checkpoint left it:
  ``python -m experiments.train runs/gmm-1/config.json --resume=true``, or the first command
  again with ``--resume=true``; a checkpoint written by another run (another config) is refused;
* by the same run when it stopped before its first checkpoint (the folder holds its
  ``config.json`` alone): the run starts over. So ``torchrun --max-restarts`` recovers at any
  moment: it resumes from the last checkpoint, or starts over.

A run folder may be moved or copied (``cp -r runs/gmm /mnt/other/gmm``): where it lies is no
part of its run, so ``--out_dir=/mnt/other/gmm --resume=true`` continues it there, exactly,
and its ``config.json`` then names its new place.

The folder is made and ``config.json`` written only once the run has started (its data, models
and checkpoint loaded): a run that fails at start-up leaves nothing behind. Every file is
written atomically (:func:`~experiments.checkpoint.write_atomic`); a full disk stops the run
with a message that says so, the previous checkpoint intact.
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
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_atomic,
)
from experiments.config import Config, config_to_dict, load
from experiments.distributed import (
    barrier,
    init_processes,
    local_share,
    mean_over_ranks,
    rank_rng_states,
    report_failure,
    seed_per_rank,
    set_rank_rng_state,
    unsharded,
)
from experiments.registry import build_task, run_names
from experiments.tasks.base import Task, lr_factor, mean_loss
from torchhyper import HyperNetwork
from torchhyper.distributed import (
    GlobalMax,
    GlobalMean,
    GlobalSum,
    cleanup,
    full_state_dict,
    load_full_state_dict,
    wrap,
)
from torchhyper.heads import HEADS

__all__ = ["train", "main"]

# Fields that may differ between a run and its resumption; out_dir, as a run folder may be
# moved or copied and resumed where it is now.
_RESUMABLE = {"resume", "device", "threads", "distributed", "out_dir"}
# config.pool -> the pool over every rank's share of a set, for global_pool=true.
GLOBAL_POOLS = {"mean": GlobalMean, "sum": GlobalSum, "max": GlobalMax}


def write_json(path: Path, data: Any) -> None:
    r"""Writes JSON atomically (:func:`~experiments.checkpoint.write_atomic`)."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), path.name)


# What a run folder holds before the run's first checkpoint: its config, and maybe the
# temporary file of a write that was cut short.
_STARTED = {"config.json", "config.json.tmp", "checkpoint.pt.tmp"}


def _changed(saved: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """The fields of two resolved configs that differ, but for those a resumed run may change."""
    return sorted(
        k
        for k in set(saved) | set(resolved)
        if k not in _RESUMABLE and saved.get(k) != resolved.get(k)
    )


def _saved_config(out: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def started_only(out: Path) -> bool:
    r"""Whether ``out`` holds a run that stopped before its first checkpoint: its
    ``config.json`` and nothing else of value (see ``_STARTED``)."""
    if not out.is_dir():
        return False
    names = {p.name for p in out.iterdir()}
    return "config.json" in names and names <= _STARTED


def check_out_dir(config: Config) -> Path:
    r"""Checks, before anything is built or written, that the run may use its folder.

    A new run takes a folder that is absent or empty, or that holds the start of the same run
    (its ``config.json`` alone: a run that stopped before its first checkpoint, which starts
    over). A resumed run takes the folder of a run with the same config (but for
    ``_RESUMABLE``, which holds ``out_dir``: the folder may have been moved since). Writes
    nothing: :func:`claim_out_dir` does, once the run has started.

    Raises:
        FileExistsError: A new run's folder holds anything else.
        FileNotFoundError: A resumed run's folder has no ``config.json``.
        ValueError: A resumed run's config differs from the saved one.
    """
    out = Path(config.out_dir)
    resolved = config_to_dict(config)
    if config.resume:
        saved_path = out / "config.json"
        if not saved_path.is_file():
            raise FileNotFoundError(
                f"cannot resume: {str(saved_path)!r} does not exist (no run in {str(out)!r}); "
                "if its run folder was moved, pass where it is now: --out_dir=NEW_PATH"
            )
        saved = json.loads(saved_path.read_text())
        changed = _changed(saved, resolved)
        if changed:
            raise ValueError(
                f"cannot resume the run in {str(out)!r}: its config differs in {changed}; "
                f"only {sorted(_RESUMABLE)} may change when resuming"
            )
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not a folder; choose a new one")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if names - (_STARTED - {"config.json"}):  # more than what a cut-short write leaves
        saved = _saved_config(out) if started_only(out) else None
        if saved is not None and not _changed(saved, resolved):
            # This very run, stopped before its first checkpoint (a torchrun restart, or by
            # hand): nothing to lose, it starts over.
            print(
                f"{str(out)!r} holds this run, stopped before its first checkpoint: it starts over",
                file=sys.stderr,
            )
            return out
        detail = (
            f" (it holds only the config.json of a run that stopped before its first "
            f"checkpoint, with another config: differs in {_changed(saved, resolved)})"
            if saved is not None
            else ""
        )
        raise FileExistsError(
            f"out_dir {str(out)!r} already exists and is not empty{detail}; choose a new "
            "out_dir, or pass --resume=true to continue the run saved there"
        )
    return out


def claim_out_dir(config: Config) -> Path:
    r"""Makes the run folder and writes the resolved ``config.json`` (a resumed run keeps its
    own, but for its ``out_dir``, set to where the folder is now); removes the temporary files
    of writes that a stopped run cut short. Call :func:`check_out_dir` first."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _STARTED - {"config.json"}:
        (out / name).unlink(missing_ok=True)
    if not config.resume:
        write_json(out / "config.json", config_to_dict(config))
        return out
    saved = _saved_config(out)
    if saved is not None and saved.get("out_dir") != config.out_dir:
        # The folder was moved or copied: its config file, itself a config, resumes it here.
        write_json(out / "config.json", {**saved, "out_dir": config.out_dir})
    return out


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


def build_optimizers(
    config: Config, hypernetwork: nn.Module, direct: nn.ModuleList
) -> dict[str, Any]:
    r"""Adam for each model, with a cosine decay to 0 over ``steps`` (or a constant rate).

    The hypernetwork's base (``bases``: the downstream's values, copied) trains at
    ``direct_lr``, the rate the downstream trains at directly, as ``HyperNetwork``'s docstring
    advises; the rest of the hypernetwork at ``lr``."""

    named = list(hypernetwork.named_parameters())  # under DDP the names start with "module."
    base = [p for n, p in named if "bases" in n.split(".")]
    rest = [p for n, p in named if "bases" not in n.split(".")]
    groups = [{"params": rest, "lr": config.lr}]
    if base:
        groups.append({"params": base, "lr": config.direct_lr})
    optimizers = {"hypernetwork": torch.optim.Adam(groups, lr=config.lr)}
    if len(direct):
        optimizers["direct"] = torch.optim.Adam(direct.parameters(), lr=config.direct_lr)
    schedulers = {
        k: torch.optim.lr_scheduler.LambdaLR(o, functools.partial(lr_factor, config))
        for k, o in optimizers.items()
    }
    return {"optimizers": optimizers, "schedulers": schedulers}


def train_step(
    config: Config,
    task: Task,
    hypernetwork: nn.Module,  # maybe wrapped (DDP, FSDP2)
    direct: nn.ModuleList,
    optim: dict[str, Any],
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
    for name, loss in losses.items():
        optim["optimizers"][name].zero_grad(set_to_none=True)
        loss.backward()
        optim["optimizers"][name].step()
        optim["schedulers"][name].step()
    return {k: v.item() for k, v in losses.items()}


def checkpoint_state(
    step: int,
    hypernetwork: nn.Module,
    direct: nn.ModuleList,
    optim: dict[str, Any],
    history: dict[str, list[float]],
    generator: torch.Generator,
    *,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    r"""Everything a resumed run needs to continue bit-identically after ``step`` steps, and
    the resolved ``config`` of the run it belongs to.

    Every rank calls it (the hypernetwork's state is gathered unsharded, whatever the wrapper);
    rank 0's is complete and is the one saved.
    """
    full = full_state_dict(hypernetwork, optim["optimizers"]["hypernetwork"])  # a collective
    return {
        "config": config,
        "step": step,
        "models": {"hypernetwork": full["model"], "direct": direct.state_dict()},
        "optimizers": {
            k: full["optimizer"] if k == "hypernetwork" else o.state_dict()
            for k, o in optim["optimizers"].items()
        },
        "schedulers": {k: s.state_dict() for k, s in optim["schedulers"].items()},
        "history": history,
        "rng": rng_state(generator),
        "rng_ranks": rank_rng_states(),
    }


def restore_state(
    checkpoint: dict[str, Any],
    hypernetwork: nn.Module,
    direct: nn.ModuleList,
    optim: dict[str, Any],
    generator: torch.Generator,
) -> tuple[int, dict[str, list[float]]]:
    r"""Loads what :func:`checkpoint_state` saved; returns the step and the loss history."""
    full = {
        "model": checkpoint["models"]["hypernetwork"],
        "optimizer": checkpoint["optimizers"]["hypernetwork"],
    }
    load_full_state_dict(hypernetwork, full, optim["optimizers"]["hypernetwork"])
    if len(direct):
        direct.load_state_dict(checkpoint["models"]["direct"])
    for k, o in optim["optimizers"].items():
        if k != "hypernetwork":
            o.load_state_dict(checkpoint["optimizers"][k])
    for k, s in optim["schedulers"].items():
        s.load_state_dict(checkpoint["schedulers"][k])
    set_rng_state(checkpoint["rng"], generator)
    set_rank_rng_state(checkpoint)
    return checkpoint["step"], checkpoint["history"]


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
    optim = build_optimizers(config, hypernetwork, direct)
    seed_per_rank(config, process)
    generator = torch.Generator().manual_seed(config.seed)  # draws the training sets
    history: dict[str, list[float]] = {k: [] for k in optim["optimizers"]}
    first = 0
    path = out / "checkpoint.pt"
    if config.resume and not path.is_file() and started_only(out):
        # Stopped before its first checkpoint (a torchrun restart, or by hand): start over.
        if process.is_main:
            print(f"no checkpoint in {str(out)!r} yet: the run starts over", file=sys.stderr)
    elif config.resume:
        checkpoint = load_checkpoint(path, map_location=device)
        check_config(checkpoint, path, resolved, _RESUMABLE)
        try:
            first, history = restore_state(checkpoint, model, direct, optim, generator)
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
            losses = train_step(config, task, model, direct, optim, generator)
            losses["hypernetwork"] = mean_over_ranks(losses["hypernetwork"])
            for k, v in losses.items():
                history[k].append(v)
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                state = checkpoint_state(
                    step + 1, model, direct, optim, history, generator, config=resolved
                )
                if process.is_main:
                    save_checkpoint(out / "checkpoint.pt", state)
    bar.close()

    evaluated = unsharded(model, hypernetwork, lambda: build_models(config, task, device)[0])
    # Free the wrapped model (DDP and FSDP2 hold the process group and its gloo threads) while
    # the interpreter is alive: left to the interpreter's exit, a rank can abort with
    # "terminate called without an active exception" (seen once in CI on a 2-rank FSDP2 run).
    del model, hypernetwork, optim
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
    overrides and returns its metrics; with ``--print-config``, prints the resolved config as
    JSON (a config file :func:`~experiments.config.load_config` reads back) and returns it."""
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
        print(
            json.dumps(
                {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=2
            )
        )
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
