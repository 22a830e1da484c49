"""Training quality: every head and base against training the downstream directly.

Each hypernetwork is the seed constructor ``HyperNetwork(input_dim, [32, 64, 96], downstream,
head=..., base=...)`` trained with Adam(lr=1e-3) on the same batches as the directly trained
downstream (Adam, lr=1e-3). The table reports the median held-out loss over 3 seeds, as a ratio
to direct training's and to the dense head's (on the default learned base, and the original
torchhyper's dense head, ``base="none"``).

Tasks:

* ``digits-85k``, ``digits-1m``, ``digits-cnn``: one task, scikit-learn's 8x8 digits (1500
  training images, 297 held out), cross-entropy. The hypernetwork reads each training batch
  (64 images): the conditioning carries no information, so the best it can do is train as
  well as direct training. MLP 64-256-256-10 (85 k), MLP 64-1024-1024-10 (1.1 M), and a CNN
  (two 3x3 convolutions, 16 and 32 channels, a linear layer: 9.9 k).
* ``set-269k``: ``benchmarks/heads.py``'s set-conditioned regression, MLP 784-256-256-10:
  the hypernetwork reads 128 (x, y) pairs of a task, y = s * (W x) + b with (s, b) per task.
* ``per-sample``: sine regression, one task per example: the hypernetwork reads an example's
  (amplitude, phase) and generates an MLP 1-64-64-1 for it (``per_sample`` +
  ``per_sample_call``), scored on 16 points of its sine. ``direct`` cannot see the task;
  ``direct+context`` is the usual alternative, an MLP that takes (x, amplitude, phase).
* ``gmm-amortized``: the experiments' amortized GMM (the run ``gmm_amortized`` of
  ``experiments/tasks/gmm.py``, fewer steps): the median KL over 20 held-out mixtures;
  ``direct`` fits each one by itself.
* ``coords``, ``teacher``, ``sinusoid``, ``line``, ``lora-set``, ``lora-id``: the conditioned
  tasks of ``benchmarks/conditioned.py`` (a digit to a coordinate MLP, a per-sample teacher,
  few-shot sinusoids, a line from its points, LoRA adapters of a tiny GPT-2 by set and by id).
  On the LoRA tasks ``direct`` is one LoRA fitted per task, and the variants include a frozen
  base (``base="frozen"``: the adapter's own init, zero ``lora_B``, held fixed).

    python benchmarks/quality.py                       # the full table (about 2 h on 2 cores)
    python benchmarks/quality.py --tasks=digits-85k --seeds=0 --variants=direct,auto,dense
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import conditioned  # noqa: E402  (benchmarks/conditioned.py: the conditioned tasks)
from heads import Tasks, mlp  # noqa: E402  (benchmarks/heads.py: the set task, the MLPs)
from record import header  # noqa: E402  (benchmarks/record.py)

from torchhyper import HyperNetwork, per_sample_call  # noqa: E402
from torchhyper.heads import HEADS  # noqa: E402

HIDDEN = [32, 64, 96]
# name -> (head, base). "auto" is the seed constructor's default.
VARIANTS: dict[str, tuple[str, str]] = {
    "auto": ("auto", "learned"),
    **{name: (name, "learned") for name in HEADS},
    "dense (base none)": ("dense", "none"),
    "auto (base none)": ("auto", "none"),
    "auto (base frozen)": ("auto", "frozen"),
    "dense (base frozen)": ("dense", "frozen"),
    "film (base frozen)": ("film", "frozen"),
}
# Variants that only the LoRA tasks run: a frozen base is the adapter's own init.
FROZEN = ("auto (base frozen)", "dense (base frozen)", "film (base frozen)")
# Dense heads over (H + 1) N values: skip them above this many generated values (a 1 M MLP's
# dense head holds 100 M parameters and takes about a second a step here).
DENSE_MAX = 300_000


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 10),
    )  # fmt: skip


def _trainable(variant: str, downstream: nn.Module, input_dim: int):
    """(module to optimize, params(context) -> dict or None for direct)."""
    if variant.startswith("direct"):
        return downstream, None
    head, base = VARIANTS[variant]
    downstream.requires_grad_(False)
    hyper = HyperNetwork(input_dim, HIDDEN, downstream, head=head, base=base)
    return hyper, hyper


def digits(variant: str, seed: int, model: str, steps: int = 1500, batch: int = 64) -> float:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1500], perm[1500:]
    torch.manual_seed(seed)
    downstream = {
        "digits-85k": lambda: mlp([64, 256, 256, 10]),
        "digits-1m": lambda: mlp([64, 1024, 1024, 10]),
        "digits-cnn": cnn,
    }[model]()
    trained, hyper = _trainable(variant, downstream, 64)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)

    def forward(xb):
        return downstream(xb) if hyper is None else functional_call(downstream, hyper(xb), xb)

    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (batch,), generator=g)]
        loss = F.cross_entropy(forward(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    trained.eval()
    with torch.no_grad():  # the hypernetwork reads each test batch of 64, as in training
        total = sum(
            F.cross_entropy(forward(x[c]), y[c], reduction="sum").item() for c in test.split(batch)
        )
    return total / len(test)


def set_task(variant: str, seed: int, steps: int = 400) -> float:
    sizes = [784, 256, 256, 10]
    tasks = Tasks(sizes[0], sizes[-1])
    torch.manual_seed(seed)
    downstream = mlp(sizes)
    trained, hyper = _trainable(variant, downstream, sizes[0] + sizes[-1])
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)

    def forward(context, x):
        return downstream(x) if hyper is None else functional_call(downstream, hyper(context), x)

    for _ in range(steps):
        (x,), target, context, _, _ = tasks.sample(g, query=1)
        loss = (forward(context, x) - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    trained.eval()
    held, losses = torch.Generator().manual_seed(12345), []
    with torch.no_grad():
        for _ in range(32):
            _, _, context, (xq,), yq = tasks.sample(held)
            losses.append((forward(context, xq) - yq).square().mean().item())
    return statistics.mean(losses)


def per_sample_task(
    variant: str, seed: int, steps: int = 1500, batch: int = 32, points: int = 16
) -> float:
    def draw(g: torch.Generator, n: int):
        amplitude = 0.5 + 2.0 * torch.rand(n, 1, generator=g)
        phase = math.pi * (2 * torch.rand(n, 1, generator=g) - 1)
        x = 10 * torch.rand(n, points, 1, generator=g) - 5
        y = amplitude[:, None] * torch.sin(x + phase[:, None])
        return torch.cat([amplitude, phase], dim=1), x, y

    torch.manual_seed(seed)
    if variant == "direct+context":
        downstream = mlp([3, 64, 64, 1])
    else:
        downstream = mlp([1, 64, 64, 1])
    trained, hyper = _trainable(variant, downstream, 2)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)

    def forward(c, x):
        if variant == "direct+context":
            return downstream(torch.cat([x, c[:, None].expand(-1, x.shape[1], -1)], dim=-1))
        if hyper is None:
            return downstream(x)
        return per_sample_call(downstream, hyper.per_sample(c), x)

    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        c, x, y = draw(g, batch)
        loss = (forward(c, x) - y).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    trained.eval()
    with torch.no_grad():
        c, x, y = draw(torch.Generator().manual_seed(12345), 512)
        return (forward(c, x) - y).square().mean().item()


def gmm_amortized(variant: str, seed: int, steps: int = 1500) -> float:
    from experiments import train

    config = "gmm_amortized"  # a registered run of experiments/tasks/gmm.py
    head, base = VARIANTS.get(variant, ("auto", "learned"))
    # The run prints its metrics: to stderr, with the progress, so that stdout holds the tables.
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):
        metrics = train.main(
            [
                config,
                f"--out_dir={out}/run",
                f"--seed={seed}",
                f"--steps={steps}",
                f"--head={head}",
                f"--base={base}",
                "--checkpoint_every=100000",
            ]
        )
    per = metrics["per_dataset"]
    key = "direct" if variant == "direct" else "hypernetwork"
    return statistics.median(per[f"kl_{key}"] if f"kl_{key}" in per else per[key])


TASKS = {
    "digits-85k": (lambda v, s: digits(v, s, "digits-85k"), 85_002),
    "digits-1m": (lambda v, s: digits(v, s, "digits-1m"), 1_126_410),
    "digits-cnn": (lambda v, s: digits(v, s, "digits-cnn"), 9_930),
    "set-269k": (set_task, 269_322),
    "per-sample": (per_sample_task, 4_353),
    "gmm-amortized": (gmm_amortized, 6),
    **{
        name: (
            lambda v, s, task=task: task(None if v.startswith("direct") else VARIANTS[v], s),
            numel,
        )
        for name, (task, numel) in conditioned.TASKS.items()
    },
}


def _run(job: tuple[str, str, int]) -> tuple[str, str, int, float, float]:
    task, variant, seed = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    loss = TASKS[task][0](variant, seed)
    return task, variant, seed, loss, time.perf_counter() - start


def jobs_for(task: str, variants: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    names = ["direct", *variants]
    if task == "per-sample":
        names.insert(1, "direct+context")
    if TASKS[task][1] > DENSE_MAX:
        names = [v for v in names if not v.startswith("dense")]
    if (
        task == "gmm-amortized"
    ):  # a whole experiment per run: the default, FiLM, no update, the original
        names = [
            v for v in names if v in ("direct", "auto", "film", "no_update", "dense (base none)")
        ]
    if not task.startswith("lora-"):
        names = [v for v in names if v not in FROZEN]
    elif task == "lora-set":  # the old default of EmbeddingHyperNetwork is for lora-id only
        names = [v for v in names if v != "auto (base none)"]
    return [(task, v, s) for v in names for s in seeds]


def table(results: dict, seeds: list[int]) -> str:
    lines = []
    for task in dict.fromkeys(t for t, _ in results):
        rows = {v: results[(t, v)] for t, v in results if t == task}
        med = {v: statistics.median(r["losses"]) for v, r in rows.items()}
        direct, dense, original = med.get("direct"), med.get("dense"), med.get("dense (base none)")
        lines += [
            f"### {task} ({TASKS[task][1]:,} downstream parameters; median of seeds {seeds})",
            "",
            "| variant | head, base | held-out loss (median) | per seed | / direct | / dense | "
            "/ dense (base none) | seconds per run |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for v, r in rows.items():
            spec = "-" if v.startswith("direct") else ", ".join(VARIANTS[v])
            cells = [
                v,
                spec,
                f"{med[v]:.4f}",
                " ".join(f"{x:.4f}" for x in r["losses"]),
                f"{med[v] / direct:.3f}" if direct else "-",
                f"{med[v] / dense:.3f}" if dense else "-",
                f"{med[v] / original:.3f}" if original else "-",
                f"{statistics.median(r['seconds']):.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if task == "coords":  # intensities in [0, 1]: PSNR = -10 log10 MSE
            psnr = ", ".join(f"{v} {-10 * math.log10(m):.2f} dB" for v, m in med.items())
            lines += ["", f"Held-out PSNR (median MSE): {psnr}."]
        lines.append("")
    return "\n".join(lines)


# Tasks whose conditioning carries nothing (single tasks): the default must match direct training.
SINGLE = ("digits-85k", "digits-1m", "digits-cnn")


def summary(results: dict) -> str:
    """The default against each reference, task by task: medians over seeds."""
    lines = [
        "| task | default (auto) | / direct | / dense | / dense (base none) | / film | "
        "frozen base: auto / dense |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in dict.fromkeys(t for t, _ in results):
        med = {v: statistics.median(r["losses"]) for (t, v), r in results.items() if t == task}
        auto = med.get("auto")
        if auto is None:
            continue

        def ratio(v: str, med: dict = med, auto: float = auto) -> str:
            return f"{auto / med[v]:.3f}" if v in med else "-"

        frozen = med.get("auto (base frozen)"), med.get("dense (base frozen)")
        cells = [
            task + (" (single task)" if task in SINGLE else ""),
            f"{auto:.4g}",
            ratio("direct"),
            ratio("dense"),
            ratio("dense (base none)"),
            ratio("film"),
            f"{frozen[0] / frozen[1]:.3f}" if all(frozen) else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--from-json", type=Path, help="print the tables of results written by --json, no runs"
    )
    args = parser.parse_args()
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        runs = raw.get("results", raw)  # {"header", "results"}, or the results alone
        loaded = {tuple(k.split("|")): v for k, v in runs.items()}
        seeds = sorted({len(v["losses"]) for v in loaded.values()})
        print(f"## Held-out loss against direct training (from {args.from_json})\n")
        print(raw.get("header", "(the run's header was not recorded)\n"))
        print("### The default against each reference\n")
        print(summary(loaded))
        print(table(loaded, list(range(max(seeds)))))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS and not v.startswith("direct")]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    jobs = [j for task in args.tasks.split(",") for j in jobs_for(task, variants, seeds)]
    # The slow ones first, so that the pool ends together.
    jobs.sort(
        key=lambda j: (j[1].startswith("dense") * TASKS[j[0]][1], j[0] == "gmm-amortized"),
        reverse=True,
    )
    results: dict = {}
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for task, variant, seed, loss, seconds in pool.imap_unordered(_run, jobs):
            r = results.setdefault((task, variant), {"losses": {}, "seconds": []})
            r["losses"][seed] = loss
            r["seconds"].append(seconds)
            print(
                f"{task} {variant} seed {seed}: {loss:.4f} ({seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    order = {
        j[:2]: i
        for i, j in enumerate(
            sorted(
                jobs,
                key=lambda j: (
                    list(TASKS).index(j[0]),
                    ["direct", "direct+context", *VARIANTS].index(j[1]),
                ),
            )
        )
    }
    ordered = {
        k: {"losses": [v["losses"][s] for s in sorted(v["losses"])], "seconds": v["seconds"]}
        for k, v in sorted(results.items(), key=lambda kv: order[kv[0]])
    }
    print(
        "## Held-out loss against direct training "
        f"(CPU, 1 thread per run, torch {torch.__version__})\n"
    )
    run = header(threads=1)  # each worker runs one thread (_run)
    print(run)
    print("### The default against each reference\n")
    print(summary(ordered))
    print(table(ordered, seeds))
    if args.json:
        runs = {f"{t}|{v}": r for (t, v), r in ordered.items()}
        args.json.write_text(json.dumps({"header": run, "results": runs}, indent=1))


if __name__ == "__main__":
    main()
