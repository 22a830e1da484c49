r"""The registered experiments: the modules of ``experiments/tasks/``, each named as the
experiment it defines (``EXPERIMENT``, an :class:`~experiments.experiment.Experiment`).

A run imports its own experiment's module and no other: an experiment is found by its name
(``experiments/tasks/<name>.py``), a run by its own (``<name>`` or ``<name>_...``). Only
listings (:func:`discover`, which ``experiments.EXPERIMENTS`` calls, :func:`run_names`, the
results command, error messages) import them all. Adding an experiment is adding its module;
nothing here or in the config loader, the trainer or the results command names one.
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
    from experiments.experiment import Task

__all__ = [
    "PACKAGE",
    "build_task",
    "discover",
    "experiment",
    "experiment_of",
    "find",
    "find_run",
    "registry",
    "run_names",
]

PACKAGE = "experiments.tasks"
r"""The package whose modules are the experiments (those starting with ``_`` are not)."""


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


def _modules() -> list[str]:
    """The names of the experiments' modules, found without importing them."""
    package = importlib.import_module(PACKAGE)
    return [i.name for i in pkgutil.iter_modules(package.__path__) if not i.name.startswith("_")]


def _load(name: str) -> Experiment | None:
    r"""The ``EXPERIMENT`` of module ``name`` (``None``: it has none, a helper).

    Raises:
        TypeError: Its ``EXPERIMENT`` is not an :class:`Experiment`.
        ValueError: Its ``EXPERIMENT`` is named otherwise than the module.
    """
    module = importlib.import_module(f"{PACKAGE}.{name}")
    found = getattr(module, "EXPERIMENT", None)
    if found is None:
        return None
    if not isinstance(found, Experiment):
        raise TypeError(
            f"{module.__name__}.EXPERIMENT must be an Experiment, got {type(found).__name__}"
        )
    if found.name != name:
        raise ValueError(
            f"{module.__name__} defines experiment {found.name!r}: an experiment's module is "
            f"named as the experiment; rename the module {found.name}.py or the experiment {name!r}"
        )
    return found


def discover() -> dict[str, Experiment]:
    r"""Imports every module of :data:`PACKAGE`; its experiments by name (:func:`registry`)."""
    return registry(e for e in map(_load, _modules()) if e is not None)


def find(name: str) -> Experiment | None:
    r"""The experiment ``name`` (``None``: there is none), importing its module alone."""
    return _load(name) if name in _modules() else None


def experiment(name: str, *, where: str = "experiment") -> Experiment:
    r"""The experiment ``name``, importing its module alone.

    Raises:
        ValueError: No experiment is named ``name``; ``where`` names what was asked.
    """
    found = find(name)
    if found is None:
        raise ValueError(f"{where} must be one of {list(discover())}, got {name!r}")
    return found


def find_run(run: str) -> Experiment | None:
    r"""The experiment that declares ``run`` (``None``: none does), importing only the modules
    its name could belong to: ``a_b_c`` is a run of ``a_b_c``, ``a_b`` or ``a``."""
    parts = run.split("_")
    for n in range(len(parts), 0, -1):
        found = find("_".join(parts[:n]))
        if found is not None and run in found.runs:
            return found
    return None


def experiment_of(run: str) -> Experiment:
    r"""The experiment that declares ``run``, one of :func:`run_names`.

    Raises:
        ValueError: No experiment has a run ``run``.
    """
    found = find_run(run)
    if found is None:
        raise ValueError(f"run must be one of {run_names()}, got {run!r}")
    return found


def run_names() -> list[str]:
    r"""The runs of every experiment, in table order (imports every experiment)."""
    return [run for e in discover().values() for run in e.runs]


def build_task(config: Config, device: torch.device) -> Task:
    r"""The task a config names, with its data and downstream built."""
    return experiment(config.experiment).task(config, device)
