r"""The registered experiments: every module of ``experiments/tasks/`` that defines
``EXPERIMENT`` (an :class:`~experiments.experiment.Experiment`), found by itself.

Modules without one (``base``, ``digits``, ``judge``: helpers) are skipped. Adding an
experiment is adding its module; nothing here or in the config loader, the trainer or the
results command names one.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import TYPE_CHECKING

from experiments.experiment import Experiment

if TYPE_CHECKING:
    import torch

    from experiments.config import Config
    from experiments.tasks.base import Task

__all__ = ["EXPERIMENTS", "build_task", "discover", "experiment_of", "registry", "run_names"]


def registry(experiments: Iterable[Experiment]) -> dict[str, Experiment]:
    r"""``experiments`` by name, in their ``order`` (then by name).

    Raises:
        ValueError: Two experiments share a name, or two runs share a name.
    """
    table: dict[str, Experiment] = {}
    runs: dict[str, str] = {}
    for experiment in sorted(experiments, key=lambda e: (e.order, e.name)):
        if experiment.name in table:
            raise ValueError(f"two experiments are named {experiment.name!r}")
        table[experiment.name] = experiment
        for run in experiment.runs:
            if run in runs:
                raise ValueError(
                    f"run {run!r} of experiment {experiment.name!r} is already a run of "
                    f"{runs[run]!r}: run names are unique over all experiments"
                )
            runs[run] = experiment.name
    return table


def discover(package: str = "experiments.tasks") -> dict[str, Experiment]:
    r"""Imports every module of ``package`` and registers the ``EXPERIMENT`` of each that has
    one (modules whose names start with ``_`` are skipped).

    Raises:
        TypeError: A module's ``EXPERIMENT`` is not an :class:`Experiment`.
    """
    found = []
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        experiment = getattr(module, "EXPERIMENT", None)
        if experiment is None:
            continue  # a helper module
        if not isinstance(experiment, Experiment):
            raise TypeError(
                f"{module.__name__}.EXPERIMENT must be an Experiment, "
                f"got {type(experiment).__name__}"
            )
        found.append(experiment)
    return registry(found)


EXPERIMENTS: dict[str, Experiment] = discover()
r"""Every experiment, by name (``config.experiment``), in listing order."""


def run_names() -> list[str]:
    r"""The runs of every experiment, in table order."""
    return [run for experiment in EXPERIMENTS.values() for run in experiment.runs]


def experiment_of(run: str) -> Experiment:
    r"""The experiment one of :func:`run_names` belongs to.

    Raises:
        ValueError: No experiment has a run ``run``.
    """
    for experiment in EXPERIMENTS.values():
        if run in experiment.runs:
            return experiment
    raise ValueError(f"run must be one of {run_names()}, got {run!r}")


def build_task(config: Config, device: torch.device) -> Task:
    r"""The task a config names, with its data and downstream built."""
    return EXPERIMENTS[config.experiment].task(config, device)
