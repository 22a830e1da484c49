"""How noisy the DDPM's Fréchet distance is: one trained run, sampled with several seeds.

Takes a finished ``ddpm`` run folder (its ``checkpoint.pt`` and ``config.json``), loads the
hypernetwork, retrains the class-embedding UNet exactly as the run does (its own seeded RNG
streams), fits the run's judge classifier, then samples both models with each sampling seed
and each number of samples per class, and prints the FD of each against the held-out digits.
The spread over sampling seeds, for models that do not change, is the noise of the metric.

    python -m experiments.train ddpm --out_dir=runs/ddpm   # or runs/results/ddpm
    python -m experiments.studies.fd_noise runs/ddpm --samples=100,500 --seeds=1,2,3  # ~15 min

Results: ``docs/results/fd-noise.md``, what
``python -m experiments.studies.fd_noise > docs/results/fd-noise.md`` printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from experiments.checkpoint import load_checkpoint
from experiments.common.class_ddpm import class_baseline, sample_class
from experiments.common.judge import frechet_distance
from experiments.config import load
from experiments.experiment import build_task
from experiments.studies import header
from experiments.train import build_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished ddpm run folder")
    parser.add_argument("--samples", default="100,500", help="samples per class, comma-separated")
    parser.add_argument("--seeds", default="1,2,3", help="sampling seeds, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.samples.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    config = load(str(args.run / "config.json"))
    if config.experiment != "ddpm" or not config.amortized:
        raise ValueError(f"run must be an amortized ddpm run, got {config.experiment!r}")
    torch.set_num_threads(max(config.threads, 1))
    print(header())
    device = torch.device("cpu")
    torch.manual_seed(config.seed)
    task = build_task(config, device)
    hypernetwork = build_models(config, task, device)[0]
    checkpoint = load_checkpoint(args.run / "checkpoint.pt", map_location=device)
    hypernetwork.load_state_dict(checkpoint["models"]["hypernetwork"])
    hypernetwork.eval()
    judge = task.judge()
    real = judge.features(task.sets.x_test)
    with torch.random.fork_rng():  # as the run trains it
        unet = class_baseline(task)[0]

    def hypernetwork_samples(k: int, n: int, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            params = hypernetwork(task.sets.train(k))
        return task.sample_params(params, n, generator)

    models = {
        "hypernetwork": hypernetwork_samples,
        "class UNet": lambda k, n, g: sample_class(task, unet, k, n, g),
    }
    fd: dict[tuple[str, int, int], float] = {}
    for n in sizes:
        for seed in seeds:
            for name, draw in models.items():
                generator = torch.Generator().manual_seed(seed)
                x = torch.cat([draw(k, n, generator) for k in range(len(task.sets))])
                fd[name, n, seed] = frechet_distance(judge.features(x), real)
            print(f"{n} per class, sampling seed {seed}: done", file=sys.stderr, flush=True)

    print(f"\n### FD of one trained ddpm run ({args.run}, training seed {config.seed})\n")
    print("| samples per class | model | FD per sampling seed | median | max - min |")
    print("| --- | --- | --- | --- | --- |")
    for n in sizes:
        ratios = [fd["hypernetwork", n, s] / fd["class UNet", n, s] for s in seeds]
        rows = [(name, [fd[name, n, s] for s in seeds]) for name in models]
        rows.append(("ratio", ratios))
        for name, values in rows:
            cells = " ".join(f"{v:.3f}" for v in values)
            spread = max(values) - min(values)
            print(f"| {n} | {name} | {cells} | {statistics.median(values):.3f} | {spread:.3f} |")


if __name__ == "__main__":
    main()
