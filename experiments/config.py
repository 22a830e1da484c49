r"""Experiment configs: JSON-like dicts, loaded into dataclasses that reject unknown keys, wrong
types and impossible values, with ``--key=value`` overrides from the command line.

    python -m experiments.train gmm --steps=500 --task.n_train=1000      # a registered run
    python -m experiments.train gmm --print-config > my.json             # its config, as JSON
    python -m experiments.train my.json --out_dir=runs/mine              # a config file

The registered runs are declared in their experiment's module (``Experiment.runs``), the one
place they are written; :func:`load_run` loads one by name, :func:`load_config` a JSON file
(one written by hand, by ``--print-config``, or a run folder's ``config.json``), :func:`load`
either.

A config has the common fields of :class:`Config` and a ``task`` object whose fields are those
of its experiment's config dataclass (``Experiment.config``, declared in the experiment's
module). Names are checked against the registries: ``experiment`` against
:mod:`experiments.experiment`, ``head``, ``base`` and ``pool`` against torchhyper's.

A key that was renamed (a config dataclass's ``renamed``: old name -> new, e.g. the VAE's
``model_hidden``, now ``hidden_sizes``) is read under its new name, with a warning, so that
the config files and run folders of earlier versions still load and resume
(:func:`upgrade`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torchhyper._spec import BASES
from torchhyper.heads import HEADS, head_names
from torchhyper.heads.build import _head_options
from torchhyper.pooling import POOLS

__all__ = [
    "Config",
    "check_each_positive",
    "check_positive",
    "check_range",
    "check_sizes",
    "load",
    "load_config",
    "load_run",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "upgrade",
]


def check_positive(where: str, **values: float) -> None:
    r"""Raises one ``ValueError`` naming every one of ``values`` that is not > 0."""
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ValueError(f"{where}: {', '.join(f'{k}={v!r}' for k, v in bad.items())} must be > 0")


def check_each_positive(where: str, name: str, values: list[float]) -> None:
    r"""Raises ``ValueError`` unless every one of ``values`` is > 0."""
    if any(not v > 0 for v in values):
        raise ValueError(f"{where}.{name} must all be > 0, got {values!r}")


def check_range(where: str, name: str, value: list[float], *, positive: bool = False) -> None:
    r"""Raises ``ValueError`` unless ``value`` is ``[low, high]`` with ``low <= high`` (and
    ``low > 0`` if ``positive``)."""
    if len(value) != 2 or not value[0] <= value[1] or (positive and not value[0] > 0):
        kind = "0 < low <= high" if positive else "low <= high"
        raise ValueError(f"{where}.{name} must be [low, high] with {kind}, got {value!r}")


def check_sizes(where: str, name: str, value: list[int]) -> None:
    r"""Raises ``ValueError`` unless ``value`` is a non-empty list of positive ints."""
    if not value or any(v < 1 for v in value):
        raise ValueError(f"{where}.{name} must be a non-empty list of positive ints, got {value!r}")


@dataclass
class Config:
    r"""Common fields of every experiment."""

    experiment: str  # a name of experiments.EXPERIMENTS
    out_dir: str
    task: Any = None  # EXPERIMENTS[experiment].config; {} gives its defaults
    amortized: bool = False  # train over a family of datasets, evaluate on held-out ones
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = 0  # torch.set_num_threads (0: leave PyTorch's default)
    steps: int = 1000
    batch_size: int = 256  # examples per set: what the hypernetwork sees
    sets_per_step: int = 1  # sets (datasets) per optimizer step
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 96])
    head: str = "auto"  # "auto" or a name of torchhyper.heads.HEADS
    head_options: dict[str, int] = field(default_factory=dict)  # e.g. {"rank": 64} for a named head
    base: str = "learned"  # HyperNetwork's base=, one of torchhyper._spec.BASES
    pool: str = "mean"  # HyperNetwork's pool=, a name of torchhyper.pooling.POOLS
    standardize: bool = False  # HyperNetwork's standardize= (each set by its own statistics)
    rho: list[int] = field(default_factory=list)  # HyperNetwork's rho= (an MLP after the pool)
    # The per-example encoder: the MLP of hidden_sizes, or "cnn" (two convolutions, then the MLP
    # of hidden_sizes[1:]) for tasks whose examples are images.
    encoder: Literal["mlp", "cnn"] = "mlp"
    # Under torchrun (experiments/distributed.py): the wrapper, and pooling over all ranks' shares.
    distributed: Literal["ddp", "fsdp2"] = "ddp"
    global_pool: bool = False
    lr: float = 1e-3  # the hypernetwork's
    direct_lr: float = 1e-2  # the downstream trained directly
    cosine: bool = True  # cosine decay of both learning rates to 0
    checkpoint_every: int = 200
    resume: bool = False
    plot_dpi: int = 70  # the plots' resolution: at 70 they are 1120 pixels wide or more

    def validate(self) -> None:
        if not self.out_dir:
            raise ValueError("config.out_dir must be a non-empty path")
        check_sizes("config", "hidden_sizes", self.hidden_sizes)
        check_positive(
            "config",
            steps=self.steps,
            batch_size=self.batch_size,
            sets_per_step=self.sets_per_step,
            lr=self.lr,
            direct_lr=self.direct_lr,
            checkpoint_every=self.checkpoint_every,
            plot_dpi=self.plot_dpi,
        )
        negative = {
            k: v
            for k, v in (
                ("threads", self.threads),
                ("seed", self.seed),
            )
            if v < 0
        }
        if negative:
            raise ValueError(f"config: {negative} must be >= 0")
        if self.head not in head_names():
            raise ValueError(f"config.head must be one of {head_names()}, got {self.head!r}")
        if self.base not in BASES:
            raise ValueError(f"config.base must be one of {list(BASES)}, got {self.base!r}")
        if self.pool not in POOLS:
            raise ValueError(f"config.pool must be one of {list(POOLS)}, got {self.pool!r}")
        if self.head_options and self.head == "auto":
            raise ValueError(f"config.head_options needs a named head {list(HEADS)}, not 'auto'")
        options = _head_options(HEADS[self.head]) if self.head_options else None
        unknown = sorted(set(self.head_options) - set(options)) if options is not None else []
        if unknown:
            raise ValueError(
                f"config.head_options has unknown keys {unknown} for head {self.head!r}; its "
                f"options are {options}"
            )
        if self.global_pool and self.pool not in ("mean", "sum", "max"):
            raise ValueError(
                f"config.global_pool needs pool='mean', 'sum' or 'max', got pool={self.pool!r}"
            )


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Returns ``value`` if it has the annotated type (ints accepted for floats), else raises."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a JSON object, got {type(value).__name__} {value!r}")
        return {k: _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where} must be a JSON list, got {type(value).__name__} {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise TypeError(
            f"{where} must be {annotation.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    missing = [
        n
        for n, f in fields.items()
        if n not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where} is missing required keys {missing}")
    values = {
        k: v if hints[k] is Any else _check_type(v, hints[k], f"{where}.{k}")
        for k, v in data.items()
    }
    return cls(**values)


def _renamed(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` with the keys of ``cls.renamed`` (old -> new) under their new names."""
    renamed: dict[str, str] = getattr(cls, "renamed", {})
    both = sorted(old for old, new in renamed.items() if old in data and new in data)
    if both:
        raise ValueError(
            f"{where} has both {both} and their new names {[renamed[k] for k in both]}; "
            "keep the new ones"
        )
    for old in [k for k in data if k in renamed]:
        warnings.warn(
            f"{where}.{old} is now {where}.{renamed[old]}: read as such; rename it in the file",
            UserWarning,
            stacklevel=3,
        )
    return {renamed.get(k, k): v for k, v in data.items()}


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    r"""A config as JSON holds it, written by this or an earlier version, with its renamed keys
    (a config dataclass's ``renamed``) under their names now, each with a warning.

    Raises:
        ValueError: A key is there under its old name and its new one.
    """
    from experiments.experiment import find

    data = _renamed(Config, data, "config")
    name = data.get("experiment")
    experiment = find(name) if isinstance(name, str) else None
    if experiment is not None and isinstance(data.get("task"), dict):
        where = f"config.task ({experiment.name})"
        data["task"] = _renamed(experiment.config, data["task"], where)
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    r"""Builds and validates a :class:`Config` (and its ``task``) from a JSON-like dict, with
    the keys of earlier versions renamed (:func:`upgrade`).

    Raises:
        ValueError: Unknown or missing keys, or impossible values.
        TypeError: A value of the wrong type.
    """
    from experiments.experiment import experiment

    config: Config = _from_dict(Config, upgrade(data), "config")
    found = experiment(config.experiment, where="config.experiment")
    where = f"config.task ({config.experiment})"
    task = config.task if config.task is not None else {}
    config.task = _from_dict(found.config, task, where)
    config.validate()
    config.task.validate(where)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    r"""The resolved config as a JSON-ready dict."""
    return dataclasses.asdict(config)


def _parse_override(arg: str) -> tuple[list[str], Any]:
    if not arg.startswith("--") or "=" not in arg:
        raise ValueError(f"overrides must look like --key=value or --task.key=value, got {arg!r}")
    key, _, text = arg[2:].partition("=")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # a bare string, e.g. --out_dir=runs/x
    return key.split("."), value


def _renamed_keys(data: dict[str, Any], keys: list[str]) -> list[str]:
    """An override's ``keys``, the last one under its name now if it was renamed (a warning)."""
    from experiments.experiment import find

    name = data.get("experiment")
    found = find(name) if len(keys) == 2 and keys[0] == "task" and isinstance(name, str) else None
    cls = Config if len(keys) == 1 else found.config if found is not None else None
    renamed: dict[str, str] = getattr(cls, "renamed", {})
    if keys[-1] not in renamed:
        return keys
    new = [*keys[:-1], renamed[keys[-1]]]
    warnings.warn(
        f"--{'.'.join(keys)} is now --{'.'.join(new)}: read as such", UserWarning, stacklevel=4
    )
    return new


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    r"""Sets each ``--key=value`` or ``--task.key=value`` of ``overrides`` (values parsed as
    JSON, else taken as strings) in ``data``, in place, a renamed key under its name now (with
    a warning); returns ``data``."""
    for arg in overrides:
        keys, value = _parse_override(arg)
        keys = _renamed_keys(data, keys)
        target = data
        for k in keys[:-1]:
            target = target.setdefault(k, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {arg!r}: {k!r} is not an object")
        target[keys[-1]] = value
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    r"""Loads a JSON config file and applies ``--key=value`` overrides (values parsed as JSON).

    The file holds a config as :func:`config_to_dict` writes it (a run folder's ``config.json``,
    ``python -m experiments.train RUN --print-config``), or any part of one: omitted fields take
    their defaults, but ``experiment`` and ``out_dir`` are required.

    Raises:
        FileNotFoundError: No such config file.
        ValueError: Invalid JSON, unknown keys or impossible values.
        TypeError: A value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise TypeError(
            f"config file {str(path)!r} must hold a JSON object, got {type(data).__name__}"
        )
    return config_from_dict(apply_overrides(upgrade(data), overrides))


def load_run(run: str, overrides: Sequence[str] = ()) -> Config:
    r"""The config of a registered run (one of ``experiments.experiment.run_names()``, e.g.
    ``"gmm_amortized"``), with ``out_dir="runs/<run>"`` and ``--key=value`` overrides.

    Raises:
        ValueError: No such run, unknown keys or impossible values.
        TypeError: A value of the wrong type.
    """
    from experiments.experiment import experiment_of

    return config_from_dict(apply_overrides(experiment_of(run).run_config(run), overrides))


def load(source: str, overrides: Sequence[str] = ()) -> Config:
    r"""The config ``python -m experiments.train SOURCE`` trains: a registered run's (a name of
    ``experiments.experiment.run_names()``), else a JSON config file's (``./NAME`` reads a file
    named like a run).

    Raises:
        FileNotFoundError: No such config file (``source`` looks like a path).
        ValueError: ``source`` is neither a run name nor a file; invalid config or overrides.
        TypeError: A value of the wrong type.
    """
    from experiments.experiment import find_run, run_names

    path = Path(source)
    if len(path.parts) == 1 and find_run(source) is not None:
        return load_run(source, overrides)
    if not path.is_file() and path.suffix != ".json" and len(path.parts) == 1:
        raise ValueError(
            f"{source!r} is neither a registered run (one of {run_names()}) nor a JSON config file"
        )
    return load_config(path, overrides)
