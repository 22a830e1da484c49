r"""What an experiment module declares: its :class:`Task` and ``EXPERIMENT = Experiment(...)``.

Each experiment is one module of ``experiments/tasks/``, named as the experiment, that holds:

* its config dataclass: the fields of ``config.task``, each with a default, and a
  ``validate(where)`` method that raises ``ValueError``
  (:func:`~experiments.config.check_positive` and :func:`~experiments.config.check_range` help);
* its :class:`Task`: the data, the downstream module and the evaluation;
* its results-table row, and its runs (named as the experiment, or that name and ``_...``);
* ``EXPERIMENT = Experiment(...)``, which ties them together under one name.

Below them, how an experiment is found: by its name (``experiments/tasks/<name>.py``), a run by
its own (``<name>`` or ``<name>_...``), importing that experiment's module and no other. Only
listings (:func:`discover`, which ``experiments.EXPERIMENTS`` calls, :func:`run_names`, the
results command, error messages) import them all. The config loader, the trainer and the
results command go through these and never name an experiment: adding an experiment is adding
its module.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

if TYPE_CHECKING:
    from experiments.config import Config

History = dict[str, list[float]]
r"""The training losses per step, by model: ``{"hypernetwork": [...], "direct": [...]}``."""

__all__ = [
    "PACKAGE",
    "Experiment",
    "History",
    "Task",
    "build_task",
    "default_verdict",
    "describe",
    "discover",
    "experiment",
    "experiment_of",
    "find",
    "find_run",
    "number",
    "percent",
    "registry",
    "run_names",
    "within",
]


class Task:
    r"""What the trainer needs from an experiment: its data, its downstream and its evaluation.

    The trainer (:mod:`experiments.train`) owns the models, optimizers, loop and checkpoints,
    and reaches a task only through these members.

    Attributes:
        config: The run's config; ``config.task`` is the experiment's config dataclass.
        device: Where the models train.
        downstream: The module whose parameters are generated (and, copied, trained directly).
        input_dim: Features per example of a set, what the hypernetwork reads (its
            ``input_dim``).
        example_shape: The shape of one example, where it is an image ``(C, H, W)``
            (``C * H * W == input_dim``); what ``encoder="cnn"`` needs. ``None``: the examples
            are plain vectors.
        num_datasets: How many fixed training datasets there are. The trainer trains one direct
            copy of the downstream per dataset, on the same sets the hypernetwork sees. 0 means
            an infinite family (fresh random datasets each step): the direct fits then happen
            at evaluation, on each held-out dataset.
    """

    downstream: nn.Module
    input_dim: int
    example_shape: tuple[int, ...] | None = None
    num_datasets: int

    def __init__(self, config: Config, device: torch.device) -> None:
        r"""Builds the data and the downstream (on ``device``) for ``config``; subclasses call
        this first."""
        self.config, self.device = config, device

    def sample(self, generator: torch.Generator) -> tuple[int, Tensor]:
        r"""One training set: ``(dataset index or -1, batch (B, *))``, drawn with ``generator``."""
        raise NotImplementedError

    def loss(self, params: dict[str, Tensor], batch: Tensor) -> Tensor:
        r"""The scalar training loss of the downstream with ``params`` on ``batch``: by default
        the negative mean of what the downstream returns, a log-density (or ELBO) ``(B,)``."""
        log_density: Tensor = functional_call(self.downstream, params, (batch,))
        return -log_density.mean()

    def evaluate(
        self, hypernetwork: nn.Module, direct: nn.ModuleList, history: History, out: Path
    ) -> dict[str, Any]:
        r"""Evaluates both models, writes the plots into ``out`` and returns the metrics."""
        raise NotImplementedError

    def finish(
        self, hypernetwork: nn.Module, direct: nn.ModuleList, history: History, out: Path
    ) -> dict[str, Any]:
        r"""What the trainer calls after training: :meth:`evaluate`, and what was trained."""
        metrics = self.evaluate(hypernetwork, direct, history, out)
        return {**metrics, "hypernetwork_model": describe(hypernetwork)}


def describe(hypernetwork: nn.Module) -> dict[str, Any]:
    r"""What was trained: the head's class and the parameter counts, for ``metrics.json``."""
    module = getattr(hypernetwork, "module", hypernetwork)  # unwrap DDP
    head = getattr(module, "head", None)
    return {
        "head": type(head).__name__ if head is not None else None,
        "parameters": sum(p.numel() for p in module.parameters()),
        "generated": getattr(module, "numel", None),
    }


def within(
    hypernetwork: float, direct: float, *, tolerance: float = 0.1, higher_is_better: bool = False
) -> bool:
    r"""Whether the hypernetwork's metric is no worse than direct training's by more than
    ``tolerance`` (relative to direct's); being better always counts."""
    margin = tolerance * abs(direct)
    return hypernetwork >= direct - margin if higher_is_better else hypernetwork <= direct + margin


def default_verdict(metrics: dict[str, Any]) -> str:
    r"""The results table's verdict: whether the task's evaluation found the hypernetwork within
    10% of direct training (``metrics["within_10_percent"]``)."""
    return "yes" if metrics["within_10_percent"] else "**no** (see the results page)"


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
        name: What ``config.experiment`` says, the name of the module that defines it
            (``experiments/tasks/<name>.py``), and the plot the task writes (``<name>.png``).
        config: The dataclass of ``config.task``: every field with a default, and a
            ``validate(where)`` method.
        task: The :class:`Task` the trainer builds, ``task(config, device)``.
        runs: The runs the results command trains, in table order: run name -> config as JSON
            would hold it, without ``experiment`` (this one) and ``out_dir`` (``runs/<run>``).
            A run's name is ``name`` or starts with ``name + "_"``, so names are unique over all
            experiments; ``python -m experiments.train RUN`` trains one.
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
        misnamed = [r for r in self.runs if r != self.name and not r.startswith(self.name + "_")]
        if misnamed:
            raise ValueError(
                f"experiment {self.name!r}: a run's name is the experiment's or starts with "
                f"{self.name + '_'!r} (so that a run finds its experiment), got {misnamed}"
            )
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


# Finding experiments and runs -------------------------------------------------------------

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
