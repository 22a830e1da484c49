r"""Checkpoints: written atomically, loaded with ``weights_only=True``, resumed exactly.

A checkpoint (:func:`checkpoint_state`) holds every ``state_dict`` of a run, its step and loss
history, the RNG states (PyTorch's global CPU and CUDA generators, every rank's, and the run's
data generator), so that a run that is interrupted and resumed (:func:`restore_state`) ends
bit-identical to one that never stopped (on the CPU), and the resolved config of the run it
belongs to, so that a run resumes only its own checkpoints.

Every file of a run is written by :func:`write_atomic`: a full disk (or any other failed write)
leaves the previous file intact and no temporary file behind, and says so.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import shutil
import warnings
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from experiments.config import upgrade
from experiments.distributed import rank_rng_states, set_rank_rng_state
from torchhyper.distributed import full_state_dict, load_full_state_dict

if TYPE_CHECKING:
    from experiments.common.fit import CosineAdam

__all__ = [
    "checkpoint_state",
    "restore_state",
    "save_checkpoint",
    "load_checkpoint",
    "check_config",
    "write_atomic",
    "rng_state",
    "set_rng_state",
]

_KEYS = ("format", "step", "models", "optimizers", "schedulers", "history", "rng")
_FORMAT = "torchhyper-experiment-1"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    r"""Every RNG state a training step draws from."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    r"""Restores what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(
    step: int,
    hypernetwork: nn.Module,
    direct: nn.ModuleList,
    optimizers: dict[str, CosineAdam],
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
    hyper = optimizers["hypernetwork"].optimizer
    full = full_state_dict(hypernetwork, hyper)  # a collective
    return {
        "config": config,
        "step": step,
        "models": {"hypernetwork": full["model"], "direct": direct.state_dict()},
        "optimizers": {
            k: full["optimizer"] if k == "hypernetwork" else o.optimizer.state_dict()
            for k, o in optimizers.items()
        },
        "schedulers": {k: o.scheduler.state_dict() for k, o in optimizers.items()},
        "history": history,
        "rng": rng_state(generator),
        "rng_ranks": rank_rng_states(),
    }


def restore_state(
    checkpoint: dict[str, Any],
    hypernetwork: nn.Module,
    direct: nn.ModuleList,
    optimizers: dict[str, CosineAdam],
    generator: torch.Generator,
) -> tuple[int, dict[str, list[float]]]:
    r"""Loads what :func:`checkpoint_state` saved; returns the step and the loss history."""
    full = {
        "model": checkpoint["models"]["hypernetwork"],
        "optimizer": checkpoint["optimizers"]["hypernetwork"],
    }
    load_full_state_dict(hypernetwork, full, optimizers["hypernetwork"].optimizer)
    if len(direct):
        direct.load_state_dict(checkpoint["models"]["direct"])
    for k, o in optimizers.items():
        if k != "hypernetwork":
            o.optimizer.load_state_dict(checkpoint["optimizers"][k])
        o.scheduler.load_state_dict(checkpoint["schedulers"][k])
    set_rng_state(checkpoint["rng"], generator)
    set_rank_rng_state(checkpoint)
    return checkpoint["step"], checkpoint["history"]


def write_atomic(path: Path, data: bytes | memoryview, what: str) -> None:
    r"""Writes ``data`` to ``path`` atomically: to ``path.tmp``, flushed to disk, then renamed
    over ``path``, so that a crash mid-write never leaves a truncated file.

    Any failure (or an interrupt) removes the temporary file and leaves ``path`` as it was.

    Raises:
        OSError: The write failed; with ``errno.ENOSPC`` (or ``EDQUOT``) a message that says
            the disk is full and names ``path`` (``what`` says what the file is).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                error.errno,
                f"no space left on the device to write the {what} {str(path)!r} "
                f"({len(data):,} bytes; {_free(path.parent)} free there): {kept} and no "
                f"temporary file is left; free some space, then resume with --resume=true",
            ) from error
        raise OSError(
            error.errno,
            f"could not write the {what} {str(path)!r} ({error.strerror or error}): {kept}; "
            "check the space left on the device and the folder's permissions",
        ) from error


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free:,} bytes"
    except OSError:
        return "unknown bytes"


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    r"""Writes ``checkpoint`` to ``path`` atomically (:func:`write_atomic`): a crash or a full
    disk never leaves a truncated checkpoint, nor a temporary file, and keeps the previous one.

    Raises:
        OSError: The write failed, e.g. no space left on the device (the message says so).
    """
    buffer = io.BytesIO()
    torch.save({"format": _FORMAT, **checkpoint}, buffer)
    write_atomic(Path(path), buffer.getbuffer(), "checkpoint")


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    r"""Loads a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``.

    Raises:
        FileNotFoundError: No checkpoint at ``path``.
        ValueError: The file is corrupt, truncated, or not a checkpoint of these experiments.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint to resume from at {str(path)!r}: run without --resume=true to start "
            "a new run (in a new out_dir)"
        )
    try:
        checkpoint: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        ValueError,
    ) as error:
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt or truncated and cannot be loaded ({error}); "
            "restore a good copy, or start a new run in a new out_dir"
        ) from None
    missing = [k for k in _KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing or checkpoint.get("format") != _FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a checkpoint of torchhyper's experiments (format {_FORMAT!r}); "
            f"missing keys {missing}"
        )
    return checkpoint


def check_config(
    checkpoint: dict[str, Any], path: Path, config: dict[str, Any], ignore: Collection[str]
) -> None:
    r"""Checks that ``checkpoint`` (loaded from ``path``) was written by the run of ``config``
    (a resolved config), comparing every field but those in ``ignore``.

    A checkpoint written before checkpoints recorded their config is taken with a warning.

    Raises:
        ValueError: The checkpoint belongs to another run; the message names both runs and
            every field that differs.
    """
    saved = checkpoint.get("config")
    if saved is None:
        warnings.warn(
            f"checkpoint {str(path)!r} records no config (written by an older trainer): "
            "cannot check that it belongs to this run",
            UserWarning,
            stacklevel=2,
        )
        return
    if not isinstance(saved, dict):
        raise ValueError(
            f"checkpoint {str(path)!r} is not a checkpoint of torchhyper's experiments: its "
            f"config is a {type(saved).__name__}, not a dict"
        )
    saved = upgrade(saved)
    differ = sorted(
        k for k in set(saved) | set(config) if k not in ignore and saved.get(k) != config.get(k)
    )
    if differ:
        shown = "; ".join(
            f"{k}: {_short(saved.get(k))} there, {_short(config.get(k))} here" for k in differ[:8]
        )
        raise ValueError(
            f"checkpoint {str(path)!r} belongs to another run: it was written by the run "
            f"{saved.get('experiment')!r} in {saved.get('out_dir')!r}, whose config differs "
            f"from this run's ({config.get('experiment')!r} in {config.get('out_dir')!r}) in "
            f"{differ} ({shown}); resume a run only from its own checkpoint, or start a new "
            "run in a new out_dir"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
