r"""Regenerates the README's results table: runs every experiment config, then tabulates each
hypernetwork metric beside direct training and the ground truth, with its plot.

    python -m experiments.results                 # runs into runs/results, writes docs/results/
    python -m experiments.results --readme        # ... and rewrites the table in README.md

Finished runs in ``--out`` are reused (interrupted ones are resumed), so the command can be
re-run after a stop. Plots are copied to ``docs/results/<name>.png``; the table goes to
``docs/results/results.md`` and, with ``--readme``, between the README's results markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from experiments.config import load_config
from experiments.tasks.base import within
from experiments.train import train

__all__ = ["RUNS", "run_all", "table"]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
RUNS = ["gmm", "gmm_amortized", "flow", "flow_amortized", "vae", "vae_amortized", "ddpm"]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def run_all(out: Path, names: list[str], overrides: list[str]) -> dict[str, dict[str, Any]]:
    r"""Runs (or reuses, or resumes) each named experiment; returns metrics with wall times."""
    results = {}
    for name in names:
        run_dir = out / name
        metrics_path = run_dir / "metrics.json"
        start = time.perf_counter()
        if not metrics_path.is_file():
            resume = ["--resume=true"] if (run_dir / "checkpoint.pt").is_file() else []
            config = load_config(
                CONFIGS / f"{name}.json", [f"--out_dir={run_dir}", *overrides, *resume]
            )
            train(config)
            seconds = time.perf_counter() - start
            (run_dir / "seconds.txt").write_text(f"{seconds:.0f}\n")
        metrics = json.loads(metrics_path.read_text())
        seconds_path = run_dir / "seconds.txt"
        metrics["seconds"] = (
            float(seconds_path.read_text()) if seconds_path.is_file() else float("nan")
        )
        results[name] = metrics
    return results


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x >= 1e-3 else f"{100 * x:.0e}%"


# The metric each verdict compares, and whether higher is better.
_VERDICT = {
    "gmm": ("kl_hypernetwork", "kl_direct", False),
    "flow": ("cov_error_vs_truth_hypernetwork", "cov_error_vs_truth_direct", False),
    "vae": ("elbo_hypernetwork", "elbo_direct", True),
    "ddpm": ("fd_hypernetwork", "fd_direct", False),
}


def _verdict(name: str, m: dict[str, Any]) -> str:
    hyper, direct, higher = _VERDICT[name.split("_")[0]]
    ok = within(m[hyper], m[direct], higher_is_better=higher)
    if name == "ddpm" and m["class_fraction_hypernetwork"] < 0.9 * m["class_fraction_direct"]:
        return "FD: yes; class fraction: **no** (see below)" if ok else "**no** (see below)"
    return "yes" if ok else "**no** (see below)"


def _row(name: str, m: dict[str, Any]) -> list[str]:
    verdict = _verdict(name, m)
    if name == "gmm":
        cells = [
            "GMM, 1-D, 2 components (the original's), 2000 points",
            "KL(true ‖ predicted), nats (Monte Carlo, 1e5 draws)",
            _f(m["kl_hypernetwork"]),
            _f(m["kl_direct"]),
            f"EM: {_f(m['kl_em'])}; truth: 0",
        ]
    elif name == "gmm_amortized":
        cells = [
            f"GMM, amortized over random mixtures; {m['eval_datasets']} held-out, {m['points_per_dataset']} points each",
            "mean KL(true ‖ predicted), nats",
            _f(m["kl_hypernetwork"]),
            f"{_f(m['kl_direct'])} (fitted per dataset)",
            f"EM: {_f(m['kl_em'])}; truth: 0",
        ]
    elif name == "flow":
        cells = [
            "Affine flow, 12-D Gaussian, mean 1, cov diag(1..12), 2000 points",
            "rel. error vs analytic MLE: mean / cov",
            f"{_pct(m['mean_error_hypernetwork'])} / {_pct(m['cov_error_hypernetwork'])}",
            f"{_pct(m['mean_error_direct'])} / {_pct(m['cov_error_direct'])}",
            f"MLE vs truth: {_pct(m['mean_error_vs_truth_mle'])} / {_pct(m['cov_error_vs_truth_mle'])}",
        ]
    elif name == "flow_amortized":
        cells = [
            f"Affine flow, amortized over random 12-D Gaussians; {m['eval_datasets']} held-out, {m['points_per_dataset']} points each",
            "rel. error vs truth: mean / cov",
            f"{_pct(m['mean_error_vs_truth_hypernetwork'])} / {_pct(m['cov_error_vs_truth_hypernetwork'])}",
            f"{_pct(m['mean_error_vs_truth_direct'])} / {_pct(m['cov_error_vs_truth_direct'])} (fitted per dataset)",
            f"MLE: {_pct(m['mean_error_vs_truth_mle'])} / {_pct(m['cov_error_vs_truth_mle'])}",
        ]
    elif name in ("vae", "vae_amortized"):
        what = (
            "VAE, all training digits"
            if name == "vae"
            else "VAE, amortized: each digit class a set (10 VAEs)"
        )
        cells = [
            what + f"; {m['test_images']} held-out digits",
            "held-out ELBO, nats/image (higher is better)",
            _f(m["elbo_hypernetwork"], 4),
            _f(m["elbo_direct"], 4) + (" (one per class)" if name != "vae" else ""),
            "—",
        ]
    else:
        cells = [
            "DDPM (diffusers UNet2DModel + DDPMScheduler), each digit class a set",
            "Fréchet distance in a digits classifier's features (lower is better) / fraction of samples of the conditioned class",
            f"{_f(m['fd_hypernetwork'])} / {_pct(m['class_fraction_hypernetwork'])}",
            f"{_f(m['fd_direct'])} / {_pct(m['class_fraction_direct'])} (one UNet per class)",
            f"real train vs held-out: {_f(m['fd_truth'])} / classifier accuracy {_pct(m['classifier_test_accuracy'])}",
        ]
    plot = f'<img src="docs/results/{name}.png" width="360" alt="{name}">'
    return [*cells, verdict, f"{m['steps']}", f"{m['seconds']:.0f}", plot]


def table(results: dict[str, dict[str, Any]]) -> str:
    r"""The markdown table of all results."""
    head = [
        "experiment",
        "metric",
        "hypernetwork",
        "direct",
        "reference",
        "hypernetwork within 10% of direct",
        "steps",
        "seconds",
        "plot",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(_row(name, m)) + " |" for name, m in results.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/results"))
    parser.add_argument("--only", nargs="*", default=RUNS, choices=RUNS)
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results")
    args, overrides = parser.parse_known_args(argv)
    total = time.perf_counter()
    results = run_all(args.out, args.only, overrides)
    args.docs.mkdir(parents=True, exist_ok=True)
    for name in results:
        experiment = name.split("_")[0]
        shutil.copyfile(args.out / name / f"{experiment}.png", args.docs / f"{name}.png")
    text = table(results)
    (args.docs / "results.md").write_text(text)
    (args.docs / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.readme:
        readme = ROOT / "README.md"
        content = readme.read_text()
        if BEGIN not in content or END not in content:
            raise ValueError(f"README.md lacks the markers {BEGIN} and {END}")
        before, rest = content.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        readme.write_text(before + BEGIN + "\n" + text + END + after)
    print(text)
    print(f"total: {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
