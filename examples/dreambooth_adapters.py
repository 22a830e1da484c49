"""Generating the LoRA of a frozen diffusion UNet from a few images of a subject (HyperDreamBooth).

A tiny diffusers ``UNet2DConditionModel`` (built from its config, random init, nothing
downloaded) is pretrained briefly as a DDPM denoiser (epsilon loss, a linear schedule of
``T = 100`` steps) on 8x8 digits (scikit-learn's ``load_digits``). A *subject* is a digit in one
of the 8 orientations of the square (4 rotations, mirrored or not): 80 subjects of 21 images,
each image in one subject; 16 are held out of everything. Cross-attention reads a fixed random
"prompt", the same for every subject: DreamBooth's identifier, whose meaning the adapter changes.

The UNet is then frozen and given PEFT LoRA layers (``unet.add_adapter(LoraConfig(...))``, rank
4 on ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and the ResNet convolutions), and a hypernetwork
(``HyperNetwork(..., encoder=<CNN>, include="*lora_*", base="frozen")``) learns to generate them
from K = 4 images of a subject, read as a set (a small CNN per image, mean-pooled). Each step
generates the adapters of 8 training subjects (``per_set``) and runs each subject's UNet on
noised other images of it, all in one call (``torchhyper.per_sample_call``).

Each held-out subject is read from its first K images and scored on its other images (the same
noise for every method): the base UNet, the generated LoRA, another subject's generated LoRA
(is the adapter specific?), a LoRA fitted on the K images (DreamBooth's fine-tuning, same rank)
and the generated LoRA fine-tuned on them (HyperDreamBooth's fast fine-tuning). The base UNet
and the generated LoRA sample from the same noise. One generated adapter is exported with
``torchhyper.adapters.save_adapter`` (diffusers' format), loaded by diffusers' own
``load_lora_adapter`` into a copy of the base UNet, and compared with the generated tensors.

    python examples/dreambooth_adapters.py --steps=400 --out=runs/dreambooth_adapters

Writes ``dreambooth_adapters.png`` (the images read, samples, held-out losses, training
curves), ``metrics.json`` (held-out loss per method and subject, the export's largest
difference) and the exported adapter, ``adapter/``.

References:
    | HyperDreamBooth (Ruiz et al., 2023) https://arxiv.org/abs/2307.06949
    | DreamBooth (Ruiz et al., 2023) https://arxiv.org/abs/2208.12242
    | Denoising Diffusion Probabilistic Models (Ho et al., 2020) https://arxiv.org/abs/2006.11239
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from torchhyper import HyperNetwork, per_sample_call
from torchhyper.adapters import save_adapter

T = 100  # diffusion steps
PER_SUBJECT = 21  # images per subject (the rarest digit has 174: at least 21 per orientation)
ORIENTATIONS = 8
WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file
BETAS = torch.linspace(1e-3, 0.2, T)  # DDPM's linear schedule, rescaled from 1000 steps to T
ALPHA_BAR = torch.cumprod(1 - BETAS, 0)  # (T,): the signal kept after step t
ALPHA_BAR_PREV = torch.cat([torch.ones(1), ALPHA_BAR[:-1]])


def subjects() -> Tensor:
    """Images ``(80, PER_SUBJECT, 1, 8, 8)`` in [-1, 1]; subject ``s`` is digit ``s // 8`` in
    orientation ``s % 8`` (``s % 4`` quarter turns, mirrored from 4 on)."""
    digits = load_digits()
    images, labels = torch.tensor(digits.images, dtype=torch.float32) / 8 - 1, digits.target
    out = []
    for digit in range(10):
        mine = images[torch.from_numpy(labels == digit)]
        for k in range(ORIENTATIONS):
            x = mine[k::ORIENTATIONS][:PER_SUBJECT].rot90(k % 4, dims=(-2, -1))
            out.append((x.flip(-1) if k >= 4 else x).unsqueeze(1))
    return torch.stack(out)


def subject_name(s: int) -> str:
    turn = f"{90 * (s % 4)}\N{DEGREE SIGN}"
    return f"digit {s // 8}, {turn}" + (", mirrored" if s % 8 >= 4 else "")


def build_unet(width: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(width, 2 * width), down_block_types=("DownBlock2D",
        "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


def noised(x0: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``x0 (*, 1, 8, 8)`` at random steps: ``(x_t, t, noise)``, ``t`` of shape ``(*)``."""
    t = torch.randint(0, T, x0.shape[:-3], generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = ALPHA_BAR[t][..., None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise


def denoise(unet: nn.Module, params: dict[str, Tensor] | None, x: Tensor, t: Tensor, prompt):
    """Predicted noise for ``x (S, Q, 1, 8, 8)``, each subject ``s`` with its adapter
    ``params[name][s]`` (``None``: the base UNet, whose LoRA ``B`` is zero)."""
    text = prompt.expand(x.shape[1], -1, -1)
    if params is None:
        flat = unet(x.flatten(0, 1), t.flatten(), text.repeat(x.shape[0], 1, 1)).sample
        return flat.unflatten(0, x.shape[:2])
    shared = {"encoder_hidden_states": text}
    return per_sample_call(unet, params, (x, t), shared=shared).sample


def loss_per_subject(unet, params, x0: Tensor, prompt, gen=None, draws=None) -> Tensor:
    """The epsilon loss ``(S,)`` on images ``x0 (S, Q, 1, 8, 8)``, at fresh or given draws."""
    x, t, noise = noised(x0, gen) if draws is None else draws
    return (denoise(unet, params, x, t, prompt) - noise).square().flatten(1).mean(1)


def optimize(parameters, loss_fn, steps: int, lr: float, bar, cosine=False) -> list[float]:
    """``steps`` Adam steps on ``loss_fn()``, the learning rate cosine-decayed or constant."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    decay = (lambda i: 0.5 * (1 + math.cos(math.pi * i / steps))) if cosine else (lambda i: 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    curve = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        curve.append(loss.item())
        bar.update()
    return curve


def pretrain(unet, images: Tensor, prompt, args, gen, bar) -> list[float]:
    flat = images.flatten(0, 1)

    def loss() -> Tensor:
        x0 = flat[torch.randint(0, len(flat), (args.batch,), generator=gen)]
        return loss_per_subject(unet, None, x0[None], prompt, gen).mean()

    return optimize(unet.parameters(), loss, args.pretrain_steps, args.pretrain_lr, bar)


def add_lora(unet: UNet2DConditionModel, rank: int) -> None:
    unet.requires_grad_(False)  # frozen: only generated (or directly fitted) LoRA moves
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))


def train_hypernetwork(unet, images: Tensor, prompt, args, gen, bar):
    encoder = nn.Sequential(  # a small CNN per image: (N, 1, 8, 8) -> (N, hidden)
        nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.SiLU(), nn.Flatten(), nn.Linear(64 * 16, args.hidden),
    )  # fmt: skip
    hyper = HyperNetwork(
        (1, 8, 8), [args.hidden], unet, encoder=encoder, include="*lora_*", base="frozen"
    )

    def loss() -> Tensor:
        chosen = torch.randint(0, len(images), (args.subjects_per_step, 1), generator=gen)
        order = torch.rand(len(chosen), PER_SUBJECT, generator=gen).argsort(1)
        shuffled = images[chosen, order]  # per subject: K images to read, others to denoise
        context, queries = shuffled[:, : args.shots], shuffled[:, args.shots :][:, : args.queries]
        return loss_per_subject(unet, hyper.per_set(context), queries, prompt, gen).mean()

    curve = optimize(hyper.parameters(), loss, args.steps, args.lr, bar, cosine=True)
    return hyper.eval(), curve


def fit_lora(unet, context: Tensor, prompt, lr: float, args, gen, bar, init=None):
    """One LoRA per subject fitted on its ``K`` images (DreamBooth's fine-tuning), from PEFT's
    init or from ``init`` (HyperDreamBooth's fast fine-tuning of a generated LoRA); all subjects
    in one batched call (Adam is per element, so this equals separate fits)."""
    if init is None:
        own = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        init = {n: p.expand(len(context), *p.shape) for n, p in own.items()}
    params = {n: p.detach().clone().requires_grad_() for n, p in init.items()}

    def loss() -> Tensor:
        return loss_per_subject(unet, params, context, prompt, gen).mean()

    curve = optimize(params.values(), loss, args.lora_steps, lr, bar)
    return {n: p.detach() for n, p in params.items()}, curve


@torch.no_grad()
def sample(unet, params, n: int, subjects: int, prompt, *, seed: int) -> Tensor:
    """DDPM ancestral sampling: ``n`` images per subject ``(S, n, 1, 8, 8)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(subjects, n, 1, 8, 8, generator=gen)
    for t in reversed(range(T)):
        eps = denoise(unet, params, x, torch.full(x.shape[:2], t), prompt)
        beta, a, a_prev = BETAS[t], ALPHA_BAR[t], ALPHA_BAR_PREV[t]
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)  # clipped, as diffusers does
        x = (a_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_prev) * x) / (1 - a)
        if t > 0:  # the posterior q(x_{t-1} | x_t, x_0)'s mean, then its noise
            x = x + (beta * (1 - a_prev) / (1 - a)).sqrt() * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def export_roundtrip(unet, fresh, params: dict[str, Tensor], x0: Tensor, prompt, folder: Path):
    """Exports one subject's adapter in diffusers' format and loads it with diffusers into
    ``fresh``, a copy of the base UNet: its outputs' largest difference from the generated's."""
    save_adapter(unet, params, folder, overwrite=True)
    fresh.load_lora_adapter(str(folder), prefix=None, weight_name=WEIGHTS)
    x, t, _ = noised(x0, torch.Generator().manual_seed(0))
    text = prompt.expand(len(x), -1, -1)
    with torch.no_grad():
        want = functional_call(unet, params, (x, t, text)).sample
        got = fresh(x, t, text).sample
    return (got - want).abs().max().item()


def montage(images: Tensor) -> Tensor:
    """Images ``(n, 1, 8, 8)`` side by side ``(8, 9 n - 1)``, NaN between them."""
    gap = torch.full((len(images), 8, 1), float("nan"))
    return torch.cat([images[:, 0], gap], -1).permute(1, 0, 2).flatten(1)[:, :-1]


COLORS = {
    "base UNet": "C0", "pretrain (base UNet)": "C0", "generated LoRA": "C3", "hypernetwork": "C3",
    "another subject's LoRA": "C7", "direct LoRA": "C1", "generated, fine-tuned": "C2",
}  # fmt: skip


def smooth(values: list[float], width: int = 20) -> list[float]:
    return [sum(values[max(0, i - width) : i + 1]) / (i + 1 - max(0, i - width))
            for i in range(len(values))]  # fmt: skip


def plot(names: list[str], panels: list[list[Tensor]], losses, curves, path: Path) -> None:
    fig = plt.figure(figsize=(12, 5), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.7, 1])
    widths = [len(x) for x in panels[0]]
    axes = left.subplots(len(names), 3, gridspec_kw={"width_ratios": widths}, squeeze=False)
    cmap = plt.get_cmap("gray_r").with_extremes(bad="#bcd3ee")
    titles = ["K images read", "base UNet: samples", "generated LoRA: samples"]
    for row, (name, images) in enumerate(zip(names, panels)):
        for col, x in enumerate(images):
            ax = axes[row, col]
            ax.imshow(montage(x).numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            if row == 0:
                ax.set_title(titles[col])
        axes[row, 0].set_ylabel(name.replace(", ", "\n", 1), fontsize=9, rotation=0,
                                ha="right", va="center")  # fmt: skip
    left.suptitle("held-out subjects (never seen by the UNet or the hypernetwork)")
    ax0, ax1 = right.subplots(2, 1)
    ax0.barh(list(losses), list(losses.values()), color=[COLORS[n] for n in losses])
    for i, value in enumerate(losses.values()):
        ax0.text(value, i, f" {value:.4f}", va="center")
    ax0.invert_yaxis()
    ax0.set(xlim=(0, 1.3 * max(losses.values())), xlabel="held-out denoising loss (eps MSE)")
    ax0.set_title("held-out subjects, other images")
    for name, curve in curves.items():
        ax1.plot(smooth(curve), label=name, color=COLORS[name])
    ax1.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log")
    ax1.legend(fontsize=8.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="hypernetwork steps")
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--lora_steps", type=int, default=100, help="per-subject LoRA fits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=16, help="the UNet's first channels")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64, help="the image encoder's width")
    parser.add_argument("--shots", type=int, default=4, help="K images read per subject")
    parser.add_argument("--queries", type=int, default=12, help="images denoised per subject")
    parser.add_argument("--subjects_per_step", type=int, default=8)
    parser.add_argument("--held_out", type=int, default=16, help="subjects held out")
    parser.add_argument("--batch", type=int, default=128, help="pretraining images per step")
    parser.add_argument("--pretrain_lr", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=1e-3, help="hypernetwork learning rate")
    parser.add_argument("--lora_lr", type=float, default=1e-3, help="direct LoRA rate")
    parser.add_argument("--finetune_lr", type=float, default=3e-4, help="generated, then fit")
    parser.add_argument("--samples", type=int, default=6, help="images sampled per subject")
    parser.add_argument("--threads", type=int, default=1, help="small models run fastest on one")
    parser.add_argument("--out", type=Path, default=Path("runs/dreambooth_adapters"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()

    images = subjects()
    held = torch.randperm(len(images), generator=gen)[: args.held_out].sort().values
    train = torch.ones(len(images), dtype=torch.bool).index_fill(0, held, False)
    prompt = torch.randn(1, 2, 32, generator=gen)  # the fixed prompt, "a photo of sks"
    unet = build_unet(args.width)
    total = args.pretrain_steps + args.steps + 2 * args.lora_steps
    with tqdm(total=total, desc="dreambooth adapters") as bar:
        curves = {"pretrain (base UNet)": pretrain(unet, images[train], prompt, args, gen, bar)}
        unet.eval()
        fresh = copy.deepcopy(unet)
        add_lora(unet, args.rank)
        hyper, curves["hypernetwork"] = train_hypernetwork(
            unet, images[train], prompt, args, gen, bar
        )
        # Held out: read the first K images of each subject, denoise the others.
        context, queries = images[held, : args.shots], images[held, args.shots :]
        fit = (unet, context, prompt)
        direct, curves["direct LoRA"] = fit_lora(*fit, args.lora_lr, args, gen, bar)
        with torch.no_grad():
            generated = hyper.per_set(context)
        tuned, curves["generated, fine-tuned"] = fit_lora(
            *fit, args.finetune_lr, args, gen, bar, init=generated
        )
    eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
    draws = [noised(queries, eval_gen) for _ in range(4)]  # the same for every method
    other = {k: v.roll(1, 0) for k, v in generated.items()}  # subject s gets s - 1's
    methods = {"base UNet": None, "generated LoRA": generated, "another subject's LoRA": other,
               "direct LoRA": direct, "generated, fine-tuned": tuned}  # fmt: skip
    with torch.no_grad():
        per_subject = {
            name: sum(loss_per_subject(unet, p, queries, prompt, draws=d) for d in draws) / 4
            for name, p in methods.items()
        }
    losses = {name: v.mean().item() for name, v in per_subject.items()}

    shown = list(range(0, len(held), max(1, len(held) // 5)))[:5]  # across the digits
    mine = {k: v[shown] for k, v in generated.items()}
    base_samples, own_samples = (
        sample(unet, p, args.samples, len(shown), prompt, seed=args.seed) for p in (None, mine)
    )  # from the same noise
    panels = [[context[i], base_samples[j], own_samples[j]] for j, i in enumerate(shown)]

    args.out.mkdir(parents=True, exist_ok=True)
    one = {k: v[0] for k, v in generated.items()}
    diff = export_roundtrip(unet, fresh, one, queries[0], prompt, args.out / "adapter")
    flat = torch.cat([v.flatten(1) for v in generated.values()], 1)  # (S, values)
    names = [subject_name(int(held[i])) for i in shown]
    plot(names, panels, losses, curves, args.out / "dreambooth_adapters.png")
    metrics = {
        "held_out_loss": losses,
        "held_out_loss_per_subject": {n: v.tolist() for n, v in per_subject.items()},
        "held_out_subjects": [subject_name(int(s)) for s in held],
        "generated_beats_base": losses["generated LoRA"] < losses["base UNet"],
        "generated_over_base_loss": losses["generated LoRA"] / losses["base UNet"],
        "generated_std_over_subjects": flat.std(0).mean().item(),
        "export_max_abs_diff": diff,
        "exported_subject": subject_name(int(held[0])),
        "lora_values": sum(v[0].numel() for v in generated.values()),
        "seconds": time.time() - start,
        "curves": curves,
        "config": vars(args) | {"out": str(args.out)},
    }
    tmp = args.out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, args.out / "metrics.json")
    for name, value in losses.items():
        print(f"held-out denoising loss, {name:22s} {value:.4f}")
    print(f"diffusers export round trip: max |diff| {diff:.2e}")
    print(f"wrote {args.out}")
    return metrics


if __name__ == "__main__":
    main()
