r"""DDPM: a hypernetwork reads a set of digits and generates every weight of a diffusion model's
UNet (diffusers' ``UNet2DModel`` with its ``DDPMScheduler``).

Amortized (the README's run): each digit class is a dataset; the hypernetwork generates one UNet
per class from that class's training images, i.e. it is conditioned on the class through the
set. Two baselines are trained directly, on the very same sets for the same steps, with the same
optimizer and learning rate (``direct_lr``): ten UNets, one per class (the trainer's "direct"),
and one UNet with a class embedding (``DDPM(num_classes=10)``, the standard class-conditional
DDPM; :mod:`experiments.common.class_ddpm`), trained after the loop on a replay of the
trainer's draws: each step the sets of all classes in one batch, each image with its class
label. Single dataset: all training digits, and the direct baseline alone.

Judged by a classifier trained here on the training split: the Fréchet distance (FD) between
its features of generated samples and of held-out real digits (lower is better), and, per
class, the fraction of samples it assigns to the class they were generated for. The FD of the
real training digits to the held-out ones, and the classifier's held-out accuracy, are the
references ("truth"). Also measured: the trained parameters of each model and the median time
of one training step of each, the three interleaved in one loop after training.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from experiments.common.class_ddpm import class_baseline, class_loss, sample_class
from experiments.common.digits import DigitsConfig, DigitsTask
from experiments.common.fit import CosineAdam, mean_loss
from experiments.common.judge import DigitClassifier, frechet_distance
from experiments.common.plots import figure, plot_losses, tile
from experiments.common.timing import median_step_ms
from experiments.config import check_positive, check_sizes
from experiments.experiment import Experiment, History, number, percent, within
from torchhyper import bind
from torchhyper.zoo import DDPM

if TYPE_CHECKING:
    from experiments.config import Config

__all__ = ["EXPERIMENT", "DDPMConfig", "DDPMTask"]

# The models of the amortized run, as metrics.json names them, and as the table and plot do.
LABELS = {
    "hypernetwork": "hypernetwork",
    "direct": "ten UNets (one per class)",
    "class_unet": "one UNet + class embedding",
}
CLASS_SHARE = 0.95  # the verdict's bar for the hypernetwork's class share


@dataclass
class DDPMConfig(DigitsConfig):
    r"""A DDPM (diffusers' UNet2DModel and DDPMScheduler) on digits, judged by a classifier."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    sample_steps: int = 100  # reverse steps when sampling
    samples_per_class: int = 100
    classifier_steps: int = 1500
    timing_steps: int = 30  # interleaved training steps timed per model (after 3 warm-up ones)
    renamed: ClassVar[dict[str, str]] = {"timesteps": "num_train_timesteps"}  # in 0.4.0

    def validate(self, where: str) -> None:
        super().validate(where)
        check_sizes(where, "block_out_channels", self.block_out_channels)
        check_positive(
            where,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            num_train_timesteps=self.num_train_timesteps,
            sample_steps=self.sample_steps,
            samples_per_class=self.samples_per_class,
            classifier_steps=self.classifier_steps,
            timing_steps=self.timing_steps,
        )
        if self.sample_steps > self.num_train_timesteps:
            raise ValueError(
                f"{where}.sample_steps ({self.sample_steps}) must be <= num_train_timesteps "
                f"({self.num_train_timesteps})"
            )


class DDPMTask(DigitsTask):
    downstream: DDPM

    def __init__(self, config: Config, device: torch.device) -> None:
        super().__init__(config, device, lambda x: 2 * x - 1)
        self.t = t = config.task
        self.ddpm_options = {
            "block_out_channels": t.block_out_channels,
            "layers_per_block": t.layers_per_block,
            "norm_num_groups": t.norm_num_groups,
            "num_train_timesteps": t.num_train_timesteps,
        }
        self.downstream = DDPM(self.sets.images.size, **self.ddpm_options)
        self.downstream.to(device).requires_grad_(False)
        # The init every direct UNet starts from (the trainer copies the downstream), for the
        # class-conditional DDPM too; kept here, before anything could touch the template.
        self.init = {k: v.clone() for k, v in self.downstream.state_dict().items()}

    def loss(self, params: dict[str, Tensor], batch: Tensor) -> Tensor:
        losses: Tensor = functional_call(self.downstream, params, (batch,))
        return losses.mean()

    def judge(self) -> DigitClassifier:
        r"""The classifier whose features the FD compares, fitted on the training split."""
        return DigitClassifier.fitted(
            self.sets.x_train,
            self.sets.images.y_train,
            steps=self.t.classifier_steps,
            seed=self.config.seed,
        )

    def sample_params(
        self, params: dict[str, Tensor], n: int, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""``n`` images from the downstream DDPM with parameters ``params`` (a hypernetwork's
        or a direct UNet's)."""
        with bind(self.downstream, params):
            return self.downstream.sample(n, steps=self.t.sample_steps, generator=generator)

    def time_steps(self, hypernetwork: nn.Module, direct: nn.ModuleList, class_ddpm: DDPM) -> Any:
        r"""The median milliseconds of one training step (``sets_per_step`` sets of
        ``batch_size``) of each model, on copies (the trained models are left as they are),
        interleaved (:func:`~experiments.common.timing.median_step_ms`)."""
        c = self.config
        hyper = copy.deepcopy(hypernetwork).train()
        tens = copy.deepcopy(direct).train()
        one = copy.deepcopy(class_ddpm).train()

        def direct_loss(sets: list[tuple[int, Tensor]]) -> Tensor:
            return mean_loss([self.loss(dict(tens[k].named_parameters()), b) for k, b in sets])

        trained = [p for p in hyper.parameters() if p.requires_grad]
        steps: dict[str, tuple[CosineAdam, Callable[[Any], Tensor]]] = {
            "hypernetwork": (
                CosineAdam(trained, lr=c.lr, steps=c.steps),
                lambda sets: mean_loss([self.loss(hyper(b), b) for _, b in sets]),
            ),
            "direct": (CosineAdam(tens.parameters(), lr=c.direct_lr, steps=c.steps), direct_loss),
            "class_unet": (
                CosineAdam(one.parameters(), lr=c.direct_lr, steps=c.steps),
                lambda sets: class_loss(one, sets),
            ),
        }
        generator = torch.Generator().manual_seed(c.seed + 4000)
        draw = lambda: [self.sample(generator) for _ in range(c.sets_per_step)]  # noqa: E731
        return median_step_ms(steps, draw, rounds=self.t.timing_steps, device=self.device)

    # Evaluation -----------------------------------------------------------------------------

    def evaluate(
        self, hypernetwork: nn.Module, direct: nn.ModuleList, history: History, out: Path
    ) -> dict[str, Any]:
        images = self.sets.images
        judge = self.judge()
        real_test = judge.features(self.sets.x_test)
        n = self.t.samples_per_class * (1 if len(self.sets) > 1 else 10)
        samples: dict[str, list[Tensor]] = {"hypernetwork": [], "direct": []}
        gen = torch.Generator(self.device).manual_seed(self.config.seed + 2000)
        jobs = [(k, name) for k in range(len(self.sets)) for name in samples]
        for k, name in tqdm(jobs, desc="sampling", dynamic_ncols=True, mininterval=1.0):
            with torch.no_grad():
                params = (
                    hypernetwork(self.sets.train(k).to(self.device))
                    if name == "hypernetwork"
                    else dict(direct[k].named_parameters())
                )
            samples[name].append(self.sample_params(params, n, gen).cpu())
        metrics: dict[str, Any] = {
            "fd_truth": frechet_distance(judge.features(self.sets.x_train), real_test),
            "classifier_test_accuracy": (judge(self.sets.x_test).argmax(1) == images.y_test)
            .float()
            .mean()
            .item(),
        }
        amortized = len(self.sets) > 1
        trained = {
            "hypernetwork": sum(p.numel() for p in hypernetwork.parameters() if p.requires_grad),
            "direct": sum(p.numel() for p in direct.parameters()),
        }
        if amortized:
            # The class-embedding baseline, with its own RNG streams: what came before (the
            # hypernetwork's and the direct UNets' samples) draws exactly what it drew without it.
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                start = time.perf_counter()
                model, losses = class_baseline(self)
                history = {**history, "class_unet": losses}
                metrics["class_unet_train_seconds"] = time.perf_counter() - start
                gen = torch.Generator(self.device).manual_seed(self.config.seed + 3000)
                samples["class_unet"] = [
                    sample_class(self, model, k, n, gen).cpu()
                    for k in tqdm(range(len(self.sets)), desc="sampling class UNet")
                ]
                trained["class_unet"] = sum(p.numel() for p in model.parameters())
                step_ms = self.time_steps(hypernetwork, direct, model)
            for name in samples:
                metrics[f"step_ms_{name}"] = step_ms[name]
        for name in samples:
            metrics[f"parameters_{name}"] = trained[name]
        for name, per_set in samples.items():
            scores = judge.score(per_set, real_test, self.sets.classes if amortized else None)
            metrics.update({f"{key}_{name}": value for key, value in scores.items()})
        for name, losses in history.items():  # the mean training loss over the last 10% of steps
            tail = losses[-max(1, len(losses) // 10) :]
            metrics[f"final_loss_{name}"] = sum(tail) / len(tail) if tail else float("nan")
        better = min(
            (name for name in samples if name != "hypernetwork"), key=lambda k: metrics[f"fd_{k}"]
        )
        metrics["better_direct"] = better
        metrics["fd_better_direct"] = metrics[f"fd_{better}"]
        metrics["within_10_percent"] = within(
            metrics["fd_hypernetwork"], metrics["fd_better_direct"]
        )
        if amortized:
            metrics["class_share_ok"] = metrics["class_fraction_hypernetwork"] >= CLASS_SHARE
        metrics["samples"] = sum(len(x) for x in samples["direct"])
        self._plot(samples, metrics, history, out / "ddpm.png")
        return metrics

    def _plot(
        self,
        samples: dict[str, list[Tensor]],
        metrics: dict[str, Any],
        history: History,
        path: Path,
    ) -> None:
        r"""Samples, one row per class, of the hypernetwork and of the better direct baseline,
        beside held-out real digits of each class; right, the training losses."""
        columns = 6
        amortized = len(self.sets) > 1
        if amortized:
            real = [self.sets.test(k) for k in range(len(self.sets))]
        else:  # one dataset: 10 rows of its samples
            real = list(self.sets.test(0)[: 10 * columns].split(columns))
            samples = {k: list(v[0][: 10 * columns].split(columns)) for k, v in samples.items()}
        better = metrics["better_direct"]
        shown = {"hypernetwork": samples["hypernetwork"], better: samples[better], "real": real}
        with figure(path, dpi=self.config.plot_dpi, size=(17, 7.5)) as fig:
            grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 2.2])
            for i, (name, rows) in enumerate(shown.items()):
                ax = fig.add_subplot(grid[0, i])
                ax.imshow(tile(rows, columns, fill=-1.0), cmap="gray_r", vmin=-1, vmax=1)
                ax.set_title(self._title(name, metrics, amortized))
                ax.set_xticks([])
                side = self.sets.images.size
                rows_at = [r * (side + 1) + side / 2 - 0.5 for r in range(len(rows))]
                ax.set_yticks(rows_at if i == 0 and amortized else [])
                if i == 0 and amortized:
                    ax.set_yticklabels([str(c) for c in self.sets.classes])
                    ax.tick_params(length=0)
            ax = fig.add_subplot(grid[0, 3])
            plot_losses(ax, history, ylabel="denoising loss", labels=LABELS)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())

    @staticmethod
    def _title(name: str, metrics: dict[str, Any], amortized: bool) -> str:
        if name == "real":
            return "real digits\n(held-out)"
        label = LABELS[name] if amortized else name
        title = (
            label.replace(" (", "\n(").replace(" + ", "\n+ ")
            + "\nFD "
            + number(metrics[f"fd_{name}"])
        )
        return title + (f", {percent(metrics[f'class_fraction_{name}'])}" if amortized else "")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _row(m: dict[str, Any]) -> list[str]:
    fraction = "class_fraction_hypernetwork" in m  # amortized: conditioned on a class

    def cell(name: str) -> str:
        text = number(m[f"fd_{name}"])
        if fraction:
            text += f" / {percent(m[f'class_fraction_{name}'])}"
        if f"step_ms_{name}" in m:
            text += (
                f" ({_count(m[f'parameters_{name}'])} params, {m[f'step_ms_{name}']:.0f} ms/step)"
            )
        return text

    if "fd_class_unet" in m:
        better = m["better_direct"]
        direct = "; ".join(
            f"{LABELS[name]}{' [better]' if name == better else ''}: {cell(name)}"
            for name in ("direct", "class_unet")
        )
    else:
        direct = cell("direct") + (" (one UNet per class)" if m["amortized"] else "")
    return [
        "DDPM (diffusers UNet2DModel + DDPMScheduler)"
        + (", each digit class a set" if m["amortized"] else ", all training digits"),
        "Fréchet distance in a digits classifier's features (lower is better)"
        + (" / fraction of samples of the conditioned class" if fraction else ""),
        cell("hypernetwork"),
        direct,
        f"real train vs held-out: {number(m['fd_truth'])} / classifier accuracy "
        f"{percent(m['classifier_test_accuracy'])}",
    ]


def _verdict(m: dict[str, Any]) -> str:
    r"""FD within 10% of the better direct baseline's (the lower FD of the two), and, when
    conditioned on a class, at least 95% of the samples in the conditioned class."""
    fd = m["within_10_percent"]
    if "class_fraction_hypernetwork" not in m:
        return "yes" if fd else "**no** (see the results page)"
    share = m.get("class_share_ok", m["class_fraction_hypernetwork"] >= CLASS_SHARE)
    vs = f" (vs {LABELS[m['better_direct']]})" if "better_direct" in m else ""
    if fd and share:
        return "yes" + vs
    return (
        f"FD: {'yes' if fd else '**no**'}; class share >= 95%: {'yes' if share else '**no**'}"
        f"{vs} (see the results page)"
    )


EXPERIMENT = Experiment(
    name="ddpm",
    config=DDPMConfig,
    task=DDPMTask,
    order=3,
    row=_row,
    verdict=_verdict,
    runs={
        "ddpm": {
            "threads": 1,
            "amortized": True,
            "steps": 3000,
            "batch_size": 32,
            "sets_per_step": 2,
            "hidden_sizes": [32, 64, 96],
            "lr": 0.001,
            "direct_lr": 0.001,
            "checkpoint_every": 500,
            "task": {
                "dataset": "digits",
                "block_out_channels": [16, 32],
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "num_train_timesteps": 1000,
                "sample_steps": 100,
                # Enough that the FD's noise between sampling seeds stays under the 10%
                # bar, which it does not at 100 (docs/results/fd-noise.md).
                "samples_per_class": 500,
                "classifier_steps": 1500,
                "timing_steps": 30,
            },
        }
    },
)
