r"""Run folders: which folder a run may take, and what it writes there first.

The run folder (``config.out_dir``) gets ``config.json`` (the resolved config, itself a config
file), ``checkpoint.pt`` (:mod:`experiments.checkpoint`, which records the config too),
``metrics.json`` and PNG plots. A non-empty run folder is never reused, except

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

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.checkpoint import write_atomic
from experiments.config import config_to_dict, upgrade

if TYPE_CHECKING:
    from experiments.config import Config

__all__ = ["RESUMABLE", "check_out_dir", "claim_out_dir", "started_only", "write_json"]

RESUMABLE = {"resume", "device", "threads", "distributed", "out_dir"}
r"""The fields of a config that may differ between a run and its resumption: how and where it
runs (``out_dir``: a run folder may be moved or copied and resumed where it is now)."""

# What a run folder holds before the run's first checkpoint: its config, and maybe the
# temporary file of a write that was cut short.
_STARTED = {"config.json", "config.json.tmp", "checkpoint.pt.tmp"}


def write_json(path: Path, data: Any) -> None:
    r"""Writes JSON atomically (:func:`~experiments.checkpoint.write_atomic`)."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), path.name)


def changed(saved: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    r"""The fields in which two resolved configs differ, but for :data:`RESUMABLE` ones;
    ``saved`` may be from an older version (:func:`~experiments.config.upgrade`)."""
    saved = upgrade(saved)
    return sorted(
        k
        for k in set(saved) | set(resolved)
        if k not in RESUMABLE and saved.get(k) != resolved.get(k)
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
    :data:`RESUMABLE`, which holds ``out_dir``: the folder may have been moved since). Writes
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
        differ = changed(json.loads(saved_path.read_text()), resolved)
        if differ:
            raise ValueError(
                f"cannot resume the run in {str(out)!r}: its config differs in {differ}; "
                f"only {sorted(RESUMABLE)} may change when resuming"
            )
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {str(out)!r} exists and is not a folder; choose a new one")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if names - (_STARTED - {"config.json"}):  # more than what a cut-short write leaves
        saved = _saved_config(out) if started_only(out) else None
        if saved is not None and not changed(saved, resolved):
            # This very run, stopped before its first checkpoint (a torchrun restart, or by
            # hand): nothing to lose, it starts over.
            print(
                f"{str(out)!r} holds this run, stopped before its first checkpoint: it starts over",
                file=sys.stderr,
            )
            return out
        detail = (
            f" (it holds only the config.json of a run that stopped before its first "
            f"checkpoint, with another config: differs in {changed(saved, resolved)})"
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
