r"""Training scripts for torchhyper's experiments (not part of the installed package).

    python -m experiments.train gmm --steps=500              # a registered run, by name
    python -m experiments.train gmm --print-config > my.json  # its config, as a JSON file
    python -m experiments.train my.json --out_dir=runs/mine   # a config file

Each experiment is one module of ``experiments/tasks/`` ending in ``EXPERIMENT =
Experiment(...)`` (:mod:`experiments.experiment`), which also declares its runs;
:data:`EXPERIMENTS` (from :mod:`experiments.registry`, imported on first use) lists them by
name.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXPERIMENTS"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing experiments.config (say) does not import every experiment first.
    if name == "EXPERIMENTS":
        from experiments.registry import EXPERIMENTS

        return EXPERIMENTS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
