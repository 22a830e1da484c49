"""The DDPM's gap to the class-embedding UNet: training noise, and variants that might close it.

Trains the amortized ``ddpm`` run's hypernetwork (variants of it) and its class-embedding UNet
alone, each on the trainer's draws of sets (its generator, seeded with the run's seed), with
the global RNG (the denoising loss's steps and noise) seeded ``10000 + stream`` for each
training stream, so that the spread over streams is the training noise. Each trained model is
sampled (500 images per class, sampling seed 50000) and judged as the run judges it: the FD in
the run's classifier's features against the held-out digits, and the share of samples in the
conditioned class.

Variants: ``class`` (the class-embedding UNet), ``class0`` (the same, its class embedding
initialized to zeros instead of diffusers' N(0, 1)), ``default`` (the run's hypernetwork),
``lr=X`` (its lr; the base keeps ``direct_lr``), ``ema=D`` (evaluated with an exponential
moving average of its weights, decay ``D``), ``shift`` (a FiLM head that shifts the vectors
only: biases and norm parameters per class, every matrix the shared base's), ``include=G``
(the hypernetwork generates only the parameters that match the glob ``G``, several joined by
``+``; the downstream's other parameters are shared by every class and trained directly, at
``direct_lr``, with it; ``include=unet.time_embedding.linear_2.bias`` is the class-embedding
UNet's family, with the class's embedding read from its set), ``unit`` and ``include1=G`` (the
``default`` and ``include=G`` hypernetworks with every generated vector shifted in absolute
units, scale 1, instead of in units of its spread: a class embedding's pace), ``cnn`` (the
``default`` with the run's ``encoder="cnn"``: two convolutions over each image of the set).

    python -m experiments.studies.ddpm_gap --variants=class,default,lr=0.003,shift --streams=1,2
    # about 5 minutes per variant and stream on one core of the 2-core CPU machine

Results: ``docs/results/ddpm-gap.md``, what
``python -m experiments.studies.ddpm_gap > docs/results/ddpm-gap.md`` printed.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from torch import Tensor, nn

from experiments.common.class_ddpm import class_ddpm, sample_class, train_class_ddpm
from experiments.common.fit import CosineAdam, mean_loss
from experiments.config import load_run
from experiments.experiment import build_task
from experiments.studies import header
from experiments.train import build_models, param_groups
from torchhyper import HyperNetwork
from torchhyper.heads import FiLMHead


def shift_only_head(in_features: int, shapes: Any) -> nn.Module:
    r"""A :class:`~torchhyper.heads.FiLMHead` whose row scales of matrices stay at 1: their
    gradients are masked out, so Adam never moves them."""
    head = FiLMHead(in_features, shapes)
    keep = head.vector[head.owner].float()
    head.linear.weight.register_hook(lambda g: g * keep[:, None])
    head.linear.bias.register_hook(lambda g: g * keep)
    return head


def train(variant: str, stream: int, config: Any, task: Any) -> tuple[nn.Module, str]:
    r"""One trained model of ``variant``, in eval mode, and its kind (``hyper`` or ``class``)."""
    name, _, value = variant.partition("=")
    torch.manual_seed(config.seed)
    if name in ("class", "class0"):
        torch.manual_seed(config.seed + 3000)  # its init, as the run draws it
        unet = class_ddpm(task)
        if name == "class0":  # every class starts at the shared UNet, as a hypernetwork does
            nn.init.zeros_(unet.unet.class_embedding.weight)
        torch.manual_seed(10_000 + stream)
        train_class_ddpm(task, unet)  # on the trainer's draws of sets
        return unet.eval(), "class"
    generator = torch.Generator().manual_seed(config.seed)  # the trainer's draws of sets
    if name == "lr":
        config.lr = float(value)
    if name == "shift":
        model: nn.Module = HyperNetwork(
            task.input_dim, config.hidden_sizes, task.downstream, head=shift_only_head
        )
    elif name in ("include", "include1"):
        model = HyperNetwork(
            task.input_dim, config.hidden_sizes, task.downstream, include=value.split("+")
        )
    elif name in ("default", "lr", "ema", "unit", "cnn"):
        if name == "cnn":
            config.encoder = "cnn"
        model = build_models(config, task, torch.device("cpu"))[0]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    if name in ("include1", "unit"):  # vectors shifted in absolute units, not their spread's
        model.scale.fill_(1.0)
    groups = param_groups(config, model)
    if name.startswith("include"):  # the parameters not generated: shared, trained directly
        generated = set(model.names)
        for n, p in task.downstream.named_parameters():
            p.requires_grad_(n not in generated)
        shared = [p for p in task.downstream.parameters() if p.requires_grad]
        groups.append({"params": shared, "lr": config.direct_lr})  # as the direct UNets train
    optimizer = CosineAdam(groups, lr=config.lr, steps=config.steps, cosine=config.cosine)
    decay = float(value) if name == "ema" else None
    average = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(10_000 + stream)
    model.train()
    for _ in range(config.steps):
        sets = [task.sample(generator) for _ in range(config.sets_per_step)]
        optimizer.step(mean_loss([task.loss(model(batch), batch) for _, batch in sets]))
        if decay is not None:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    average[n].lerp_(p, 1 - decay)
    if decay is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(average[n])
    return model.eval(), "hyper"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="class,default,lr=0.003,shift")
    parser.add_argument("--streams", default="1,2", help="training RNG streams, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (data, judge, init)")
    parser.add_argument("--steps", type=int, default=0, help="0: the run's")
    parser.add_argument("--samples", type=int, default=500, help="samples per class")
    args = parser.parse_args()
    print(header(threads=1))

    overrides = [
        f"--seed={args.seed}",
        "--out_dir=unused",
        f"--task.samples_per_class={args.samples}",
    ]
    if args.steps:
        overrides.append(f"--steps={args.steps}")
    torch.set_num_threads(1)
    streams = [int(s) for s in args.streams.split(",")]
    rows = []
    for variant in args.variants.split(","):
        fds, shares = [], []
        for stream in streams:
            config = load_run("ddpm", overrides)
            torch.manual_seed(config.seed)
            task = build_task(config, torch.device("cpu"))
            judge = task.judge()
            real = judge.features(task.sets.x_test)
            model, kind = train(variant, stream, config, task)
            generator = torch.Generator().manual_seed(50_000)
            per_class: list[Tensor] = []
            with torch.no_grad():
                for k in range(len(task.sets)):
                    if kind == "hyper":
                        params = model(task.sets.train(k))
                        per_class.append(task.sample_params(params, args.samples, generator))
                    else:
                        per_class.append(sample_class(task, model, k, args.samples, generator))
            scores = judge.score(per_class, real, task.sets.classes)
            fds.append(scores["fd"])
            shares.append(scores["class_fraction"])
            # The FD's first term: how far the samples' mean feature lies from the real one's.
            features = judge.features(torch.cat(per_class))
            mean_term = (features.mean(0) - real.mean(0)).square().sum().item()
            print(
                f"- {variant} stream {stream}: FD {fds[-1]:.3f} (mean term {mean_term:.3f}), "
                f"share {shares[-1]:.3f}",
                flush=True,
            )
        rows.append((variant, fds, shares))
    reference = next((statistics.median(f) for v, f, _ in rows if v == "class"), None)
    print(f"\n### ddpm, seed {args.seed}, streams {streams}, {args.samples} samples per class\n")
    print("| variant | FD per stream | median | / class UNet | class share |")
    print("| --- | --- | --- | --- | --- |")
    for variant, fds, shares in rows:
        median = statistics.median(fds)
        ratio = f"{median / reference:.2f}x" if reference else "-"
        print(
            f"| {variant} | {' '.join(f'{f:.3f}' for f in fds)} | {median:.3f} | {ratio} "
            f"| {statistics.median(shares):.1%} |"
        )


if __name__ == "__main__":
    main()
