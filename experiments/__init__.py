r"""Training scripts for torchhyper's experiments (not part of the installed package).

    python -m experiments.train gmm --steps=500              # a registered run, by name
    python -m experiments.train gmm --print-config > my.json  # its config, as a JSON file
    python -m experiments.train my.json --out_dir=runs/mine   # a config file

Each experiment is one module of ``experiments/tasks/``, named as the experiment, ending in
``EXPERIMENT = Experiment(...)`` (:mod:`experiments.experiment`), which also declares its runs;
:data:`EXPERIMENTS` (:func:`experiments.experiment.discover`, which imports them all) lists them
by name. A run imports its own experiment alone.

Layout: the trainer and its policies here (``train``, ``config``, ``experiment``, ``runs``,
``checkpoint``, ``distributed``, ``results``); the experiments in ``tasks/``; the helpers they
share in ``common/``; studies of the experiments, each with its results, in ``studies/``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXPERIMENTS"]


def __getattr__(name: str) -> Any:
    # Lazy, and read afresh: a run imports its own experiment alone.
    if name == "EXPERIMENTS":
        from experiments.experiment import discover

        return discover()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
