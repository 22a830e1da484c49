r"""Checkpoints: written atomically, loaded with ``weights_only=True``, resumed exactly.

A checkpoint holds every ``state_dict`` of a run, its step and loss history, and the RNG states
(PyTorch's global CPU and CUDA generators and the run's data generator), so that a run that is
interrupted and resumed ends bit-identical to one that never stopped (on the CPU).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

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


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    r"""Writes ``checkpoint`` to ``path`` atomically: to a temporary file, then renamed over it,
    so a crash mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": _FORMAT, **checkpoint}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
