r"""Experiment configs: native JSON, loaded into dataclasses that reject unknown keys, wrong types
and impossible values, with ``--key=value`` overrides from the command line.

    python -m experiments.train experiments/configs/gmm.json --steps=500 --task.n_train=1000

A config has the common fields of :class:`Config` and a ``task`` object whose fields depend on
``experiment`` (:class:`GMMTask`, :class:`FlowTask`, :class:`VAETask`, :class:`DDPMTask`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torchhyper.heads import HEADS, head_names

__all__ = [
    "Config",
    "GMMTask",
    "FlowTask",
    "VAETask",
    "DDPMTask",
    "TASKS",
    "load_config",
    "config_from_dict",
    "config_to_dict",
]


def _positive(where: str, **values: float) -> None:
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ValueError(f"{where}: {', '.join(f'{k}={v!r}' for k, v in bad.items())} must be > 0")


def _range(where: str, name: str, value: list[float], *, positive: bool = False) -> None:
    if len(value) != 2 or not value[0] <= value[1] or (positive and not value[0] > 0):
        kind = "0 < low <= high" if positive else "low <= high"
        raise ValueError(f"{where}.{name} must be [low, high] with {kind}, got {value!r}")


@dataclass
class GMMTask:
    r"""A 1-D Gaussian mixture (the original's: weights 0.8/0.2, means 0 and 2, variances 1)."""

    weights: list[float] = field(default_factory=lambda: [0.8, 0.2])
    means: list[float] = field(default_factory=lambda: [0.0, 2.0])
    variances: list[float] = field(default_factory=lambda: [1.0, 1.0])
    n_train: int = 2000  # the fixed training sample (single dataset)
    mc_samples: int = 100_000  # Monte-Carlo samples for KL(true || predicted)
    # Amortized: random mixtures with these ranges, evaluated on held-out ones.
    mean_range: list[float] = field(default_factory=lambda: [-4.0, 4.0])
    variance_range: list[float] = field(default_factory=lambda: [0.25, 2.0])
    eval_datasets: int = 20
    direct_steps: int = 1000  # steps of the direct fit of each held-out dataset

    def validate(self, where: str) -> None:
        k = len(self.weights)
        if k == 0 or len(self.means) != k or len(self.variances) != k:
            raise ValueError(
                f"{where}: weights, means and variances must be non-empty lists of one length, got "
                f"{len(self.weights)}, {len(self.means)} and {len(self.variances)} entries"
            )
        if any(w <= 0 for w in self.weights) or not math.isclose(
            sum(self.weights), 1.0, abs_tol=1e-6
        ):
            raise ValueError(f"{where}.weights must be positive and sum to 1, got {self.weights!r}")
        if any(not v > 0 for v in self.variances):
            raise ValueError(f"{where}.variances must all be > 0, got {self.variances!r}")
        _positive(
            where,
            n_train=self.n_train,
            mc_samples=self.mc_samples,
            eval_datasets=self.eval_datasets,
            direct_steps=self.direct_steps,
        )
        _range(where, "mean_range", self.mean_range)
        _range(where, "variance_range", self.variance_range, positive=True)


@dataclass
class FlowTask:
    r"""An element-wise affine flow fitted to a Gaussian (the original's: 12-D, mean 1,
    covariance diag(1..12))."""

    mean: list[float] = field(default_factory=lambda: [1.0] * 12)
    variances: list[float] = field(default_factory=lambda: [float(i) for i in range(1, 13)])
    n_train: int = 2000
    mean_range: list[float] = field(default_factory=lambda: [-3.0, 3.0])
    variance_range: list[float] = field(default_factory=lambda: [0.5, 12.0])
    eval_datasets: int = 20
    direct_steps: int = 1000

    def validate(self, where: str) -> None:
        if not self.mean or len(self.mean) != len(self.variances):
            raise ValueError(
                f"{where}: mean and variances must be non-empty lists of one length, got "
                f"{len(self.mean)} and {len(self.variances)} entries"
            )
        if any(not v > 0 for v in self.variances):
            raise ValueError(f"{where}.variances must all be > 0, got {self.variances!r}")
        _positive(
            where,
            n_train=self.n_train,
            eval_datasets=self.eval_datasets,
            direct_steps=self.direct_steps,
        )
        _range(where, "mean_range", self.mean_range)
        _range(where, "variance_range", self.variance_range, positive=True)


@dataclass
class _DigitsTask:
    dataset: Literal["digits", "mnist"] = "digits"
    data_path: str = ""  # for "mnist": an .npz file or a folder of IDX files
    test_fraction: float = 0.25
    max_train: int = 0  # use at most this many training images (0: all)

    def validate(self, where: str) -> None:
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"{where}.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.dataset == "mnist" and not self.data_path:
            raise ValueError(
                f"{where}.data_path must name MNIST's .npz file or IDX folder for dataset='mnist'"
            )
        if self.max_train < 0:
            raise ValueError(f"{where}.max_train must be >= 0, got {self.max_train!r}")


@dataclass
class VAETask(_DigitsTask):
    r"""A VAE on binarized digits; ELBO in nats per image on the held-out split."""

    latent_dim: int = 8
    model_hidden: list[int] = field(default_factory=lambda: [128])
    elbo_samples: int = 10

    def validate(self, where: str) -> None:
        super().validate(where)
        if not self.model_hidden or any(h < 1 for h in self.model_hidden):
            raise ValueError(
                f"{where}.model_hidden must be a non-empty list of positive ints, got {self.model_hidden!r}"
            )
        _positive(where, latent_dim=self.latent_dim, elbo_samples=self.elbo_samples)


@dataclass
class DDPMTask(_DigitsTask):
    r"""A DDPM (diffusers' UNet2DModel and DDPMScheduler) on digits, judged by a classifier."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    timesteps: int = 1000
    sample_steps: int = 100  # reverse steps when sampling
    samples_per_class: int = 100
    classifier_steps: int = 1500

    def validate(self, where: str) -> None:
        super().validate(where)
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError(
                f"{where}.block_out_channels must be a non-empty list of positive ints, got {self.block_out_channels!r}"
            )
        _positive(
            where,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            timesteps=self.timesteps,
            sample_steps=self.sample_steps,
            samples_per_class=self.samples_per_class,
            classifier_steps=self.classifier_steps,
        )
        if self.sample_steps > self.timesteps:
            raise ValueError(
                f"{where}.sample_steps ({self.sample_steps}) must be <= timesteps ({self.timesteps})"
            )


TASKS: dict[str, type] = {"gmm": GMMTask, "flow": FlowTask, "vae": VAETask, "ddpm": DDPMTask}


@dataclass
class Config:
    r"""Common fields of every experiment."""

    experiment: Literal["gmm", "flow", "vae", "ddpm"]
    out_dir: str
    task: Any = None  # one of TASKS[experiment]; {} gives its defaults
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
    base: Literal["learned", "frozen", "none"] = "learned"  # HyperNetwork's base=
    pool: Literal["mean", "sum", "max", "attention"] = "mean"  # HyperNetwork's pool=
    pool_layers: int = 0  # MLP layers after a mean pool (Deep Sets' rho); 0: the plain pool
    # Under torchrun (experiments/distributed.py): the wrapper, and pooling over all ranks' shares.
    distributed: Literal["ddp", "fsdp2"] = "ddp"
    global_pool: bool = False
    lr: float = 1e-3  # the hypernetwork's
    direct_lr: float = 1e-2  # the downstream trained directly
    cosine: bool = True  # cosine decay of both learning rates to 0
    checkpoint_every: int = 200
    resume: bool = False
    plot_dpi: int = 70

    def validate(self) -> None:
        if not self.out_dir:
            raise ValueError("config.out_dir must be a non-empty path")
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(
                f"config.hidden_sizes must be a non-empty list of positive ints, got {self.hidden_sizes!r}"
            )
        _positive(
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
                ("pool_layers", self.pool_layers),
            )
            if v < 0
        }
        if negative:
            raise ValueError(f"config: {negative} must be >= 0")
        if self.head not in head_names():
            raise ValueError(f"config.head must be one of {head_names()}, got {self.head!r}")
        if self.head_options and self.head == "auto":
            raise ValueError(f"config.head_options needs a named head {list(HEADS)}, not 'auto'")
        if self.pool_layers and self.pool != "mean":
            raise ValueError(f"config.pool_layers > 0 needs pool='mean', got pool={self.pool!r}")
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


def config_from_dict(data: dict[str, Any]) -> Config:
    r"""Builds and validates a :class:`Config` (and its ``task``) from a JSON-like dict.

    Raises:
        ValueError: Unknown or missing keys, or impossible values.
        TypeError: A value of the wrong type.
    """
    config = _from_dict(Config, data, "config")
    task = config.task if config.task is not None else {}
    config.task = _from_dict(TASKS[config.experiment], task, f"config.task ({config.experiment})")
    config.validate()
    config.task.validate(f"config.task ({config.experiment})")
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


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    r"""Loads a JSON config file and applies ``--key=value`` overrides (values parsed as JSON).

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
    for arg in overrides:
        keys, value = _parse_override(arg)
        target = data
        for k in keys[:-1]:
            target = target.setdefault(k, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {arg!r}: {k!r} is not an object")
        target[keys[-1]] = value
    return config_from_dict(data)
