"""The set-encoding features, one at a time, on the amortized experiments: medians of 3 seeds.

Each variant is the experiment's own run (``experiments/tasks/<name>.py``) with its set
encoding replaced: ``mean`` (the plain mean pool: no standardize, no rho) or features joined by
``+``: ``standardize`` (each set standardized by its own statistics, which are appended to the
embedding), ``moments`` (the mean and standard deviation of the encodings), ``attention`` (PMA:
learned queries attend to the set), ``rho`` (Deep Sets' rho, an MLP of [96, 96] after the
pool, which can form nonlinear maps of the pooled statistics). Scores:
the amortized flow's covariance and mean errors against the truth, the amortized GMM's mean
and median KL, each over the run's held-out datasets; "direct" fits each held-out dataset by
itself (the same in every variant of a seed).

    python -m experiments.studies.set_encoding                  # ~30 min on 2 cores
    python -m experiments.studies.set_encoding --runs=flow_amortized --variants=mean,standardize

Results: ``docs/results/set-encoding.md``, what
``python -m experiments.studies.set_encoding > docs/results/set-encoding.md`` printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from experiments.config import load_run
from experiments.studies import header
from experiments.train import train

# Each variant sets all four fields, whatever the run's default holds.
PLAIN = {"standardize": "false", "pool": "mean", "rho": "[]"}
FEATURES = {
    "standardize": {"standardize": "true"},
    "moments": {"pool": "moments"},
    "attention": {"pool": "attention"},
    "rho": {"rho": "[96,96]"},
}
VARIANTS = {
    "flow_amortized": [
        "mean", "standardize", "moments", "attention", "rho", "standardize+rho"
    ],
    "gmm_amortized": ["mean", "rho", "standardize+rho", "moments+rho", "attention+rho"],
}  # fmt: skip


def overrides(variant: str) -> list[str]:
    """``--key=value`` overrides of a variant: ``mean`` (the plain mean pool) or features
    joined by ``+``."""
    fields = dict(PLAIN)
    for feature in variant.split("+"):
        if feature != "mean":
            fields.update(FEATURES[feature])
    return [f"--{k}={v}" for k, v in fields.items()]


SCORES = {
    "flow_amortized": [
        ("cov error", "cov_error_vs_truth_{}"),
        ("mean error", "mean_error_vs_truth_{}"),
    ],
    "gmm_amortized": [("mean KL", "kl_{}"), ("median KL", "kl_median_{}")],
}


def _run(job: tuple[str, str, int, list[str]]) -> tuple[str, str, int, dict, float]:
    run, variant, seed, overrides = job
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        config = load_run(run, [f"--out_dir={out}/run", f"--seed={seed}", *overrides])
        train(config)
        metrics = json.loads((Path(out) / "run" / "metrics.json").read_text())
    return run, variant, seed, metrics, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(SCORES))
    parser.add_argument("--variants", default="", help="default: each run's list in VARIANTS")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(header(threads=1))  # each run's config sets threads=1
    runs = args.runs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = []
    for run in runs:
        for variant in args.variants.split(",") if args.variants else VARIANTS[run]:
            jobs += [(run, variant, seed, overrides(variant)) for seed in seeds]
    results: dict[tuple[str, str], list[dict]] = {}
    seconds: dict[tuple[str, str], list[float]] = {}
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for run, variant, seed, metrics, took in pool.imap(_run, jobs):
            print(f"- {run} {variant} seed {seed}: {took:.0f} s", flush=True)
            results.setdefault((run, variant), []).append(metrics)
            seconds.setdefault((run, variant), []).append(took)
    for run in runs:
        scores = SCORES[run]
        print(f"\n### {run} (medians of seeds {seeds})\n")
        head = [f"{label}: {who}" for label, _ in scores for who in ("hypernetwork", "direct")]
        print("| variant | " + " | ".join(head) + " | per seed (first score) | seconds |")
        print("|" + " --- |" * (len(head) + 3))
        for (r, variant), ms in results.items():
            if r != run:
                continue
            cells = [
                f"{statistics.median(m[key.format(who)] for m in ms):.4g}"
                for _, key in scores
                for who in ("hypernetwork", "direct")
            ]
            first = " ".join(f"{m[scores[0][1].format('hypernetwork')]:.4g}" for m in ms)
            took = statistics.median(seconds[(r, variant)])
            print(f"| {variant} | " + " | ".join(cells) + f" | {first} | {took:.0f} |")


if __name__ == "__main__":
    main()
