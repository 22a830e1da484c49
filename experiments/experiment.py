r"""What an experiment file declares: one :class:`Experiment`, ``EXPERIMENT = Experiment(...)``.

Each experiment is one module of ``experiments/tasks/`` that holds, in one file:

* its config dataclass: the fields of ``config.task``, each with a default, and a
  ``validate(where)`` method that raises ``ValueError``
  (:func:`~experiments.config.check_positive` and :func:`~experiments.config.check_range` help);
* its :class:`~experiments.tasks.base.Task`: the data, the downstream module and the evaluation;
* its results-table row, and the runs the results command trains;
* ``EXPERIMENT = Experiment(...)``, which ties them together under one name.

:mod:`experiments.registry` finds the module by itself (any module of ``experiments/tasks/``
that defines ``EXPERIMENT``); the config loader, the trainer and the results command read the
registry and never name an experiment.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from experiments.tasks.base import Task

__all__ = ["Experiment", "default_verdict", "number", "percent"]


def default_verdict(metrics: dict[str, Any]) -> str:
    r"""The results table's verdict: whether the task's evaluation found the hypernetwork within
    10% of direct training (``metrics["within_10_percent"]``)."""
    return "yes" if metrics["within_10_percent"] else "**no** (see below)"


def number(x: float, digits: int = 3) -> str:
    r"""A metric for the results table: ``digits`` significant digits, tiny values as 1.2e-04."""
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def percent(x: float) -> str:
    r"""A fraction for the results table, as a percentage."""
    return f"{100 * x:.1f}%" if x >= 1e-3 else f"{100 * x:.0e}%"


@dataclass(frozen=True)
class Experiment:
    r"""One experiment's entry in :data:`experiments.EXPERIMENTS`.

    Its ``__doc__`` is ``summary``, or else the first paragraph of the docstring of the module
    that defines ``task``: what the docs' table of experiments shows.

    Args:
        name: What ``config.experiment`` says, and the plot the task writes (``<name>.png``).
        config: The dataclass of ``config.task``: every field with a default, and a
            ``validate(where)`` method.
        task: The :class:`~experiments.tasks.base.Task` the trainer builds, ``task(config,
            device)``.
        runs: The runs the results command trains, in table order: run name -> config as JSON
            would hold it, without ``experiment`` (this one) and ``out_dir`` (``runs/<run>``).
            Run names are unique over all experiments; ``python -m experiments.train RUN``
            trains one.
        row: The results table's first five cells of a run, from its ``metrics.json``: what
            was run, the metric, the hypernetwork's value, direct training's, the reference.
        verdict: The cell "hypernetwork within 10% of direct", from a run's metrics.
        order: Where the experiment comes in listings (the results table, error messages):
            lower first, then by name.
        summary: One line on the experiment, for the docs.

    Example:
        >>> EXPERIMENT = Experiment(  # doctest: +SKIP
        ...     "gmm", GMMConfig, GMMTask, runs={"gmm": {"steps": 2000}}, row=_row, order=0
        ... )
    """

    name: str
    config: type
    task: type[Task]
    runs: dict[str, dict[str, Any]]
    row: Callable[[dict[str, Any]], list[str]]
    verdict: Callable[[dict[str, Any]], str] = default_verdict
    order: int = 100
    summary: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"an experiment's name must be an identifier, got {self.name!r}")
        if not dataclasses.is_dataclass(self.config) or not callable(
            getattr(self.config, "validate", None)
        ):
            raise TypeError(
                f"experiment {self.name!r}: config must be a dataclass with a validate() method"
            )
        if not (isinstance(self.task, type) and issubclass(self.task, Task)):
            raise TypeError(f"experiment {self.name!r}: task must be a Task subclass")
        module = sys.modules.get(self.task.__module__)
        doc = self.summary or (getattr(module, "__doc__", None) or self.task.__doc__ or "")
        object.__setattr__(self, "__doc__", doc.strip().split("\n\n", 1)[0])

    def run_config(self, run: str) -> dict[str, Any]:
        r"""The full config of one of :attr:`runs`, as a fresh JSON-like dict (with
        ``experiment`` and ``out_dir="runs/<run>"``), ready for ``--key=value`` overrides.

        Raises:
            ValueError: ``run`` is not one of :attr:`runs`.
        """
        if run not in self.runs:
            raise ValueError(
                f"run must be one of experiment {self.name!r}'s {list(self.runs)}, got {run!r}"
            )
        return {"experiment": self.name, "out_dir": f"runs/{run}", **_copy(self.runs[run])}


def _copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _copy(v) for k, v in data.items()}
    return [_copy(v) for v in data] if isinstance(data, list) else data
