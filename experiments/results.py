r"""Regenerates the README's results table: trains every registered run, then tabulates each
hypernetwork metric beside direct training and the ground truth, with its plot.

    python -m experiments.results                 # runs into runs/results, writes docs/results/
    python -m experiments.results --readme        # ... and rewrites the table in README.md
    python -m experiments.results --tables-only --readme   # the tables from the last metrics.json

The runs are those of every registered experiment (``Experiment.runs``, in
``experiments/tasks/<name>.py``), each row from its experiment's ``row``. Finished runs in
``--out`` are reused (interrupted ones are resumed), so the command can be re-run after a stop.
Plots are copied to ``docs/results/<name>.png``; the table goes to ``docs/results/results.md``
(below the run's provenance: commit, torch, threads, command, date) and, with ``--readme``, a
short form of it (one line per run: its metric, the hypernetwork, direct training, the verdict)
between the README's results markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from experiments.config import load_run
from experiments.experiment import experiment_of, run_names
from experiments.studies import header
from experiments.train import train

__all__ = ["run_all", "short_table", "table"]

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def run_all(out: Path, names: list[str], overrides: list[str]) -> dict[str, dict[str, Any]]:
    r"""Runs (or reuses, or resumes) each named run; returns metrics with wall times."""
    results = {}
    for name in names:
        run_dir = out / name
        metrics_path = run_dir / "metrics.json"
        start = time.perf_counter()
        if not metrics_path.is_file():
            resume = ["--resume=true"] if (run_dir / "checkpoint.pt").is_file() else []
            train(load_run(name, [f"--out_dir={run_dir}", *overrides, *resume]))
            seconds = time.perf_counter() - start
            (run_dir / "seconds.txt").write_text(f"{seconds:.0f}\n")
        metrics = json.loads(metrics_path.read_text())
        seconds_path = run_dir / "seconds.txt"
        metrics["seconds"] = (
            float(seconds_path.read_text()) if seconds_path.is_file() else float("nan")
        )
        results[name] = metrics
    return results


def _row(name: str, m: dict[str, Any]) -> list[str]:
    experiment = experiment_of(name)
    src = f"docs/results/{name}.png"  # shown at 360 px, a click away from full size
    plot = f'<a href="{src}"><img src="{src}" width="360" alt="{name}"></a>'
    return [
        *experiment.row(m),
        experiment.verdict(m),
        f"{m['steps']}",
        f"{m['seconds']:.0f}",
        plot,
    ]


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


def short_table(results: dict[str, dict[str, Any]]) -> str:
    r"""The README's form of the table: one line per run, without references and plots."""
    lines = [
        "| run | metric | hypernetwork | direct | within 10% of direct |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in results.items():
        experiment = experiment_of(name)
        _, metric, hyper, direct, _ = experiment.row(m)
        verdict = experiment.verdict(m)
        lines.append(f"| `{name}` | {metric} | {hyper} | {direct} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/results"))
    runs = run_names()
    parser.add_argument("--only", nargs="*", default=runs, choices=runs)
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="train nothing: rewrite the tables from the --docs folder's metrics.json",
    )
    args, overrides = parser.parse_known_args(argv)
    provenance = header()  # before this run writes anything into the checkout
    total = time.perf_counter()
    args.docs.mkdir(parents=True, exist_ok=True)
    if args.tables_only:
        results = json.loads((args.docs / "metrics.json").read_text())
    else:
        results = run_all(args.out, args.only, overrides)
        for name in results:
            plot = args.out / name / f"{experiment_of(name).name}.png"
            shutil.copyfile(plot, args.docs / f"{name}.png")
        (args.docs / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    (args.docs / "results.md").write_text(provenance + "\n" + text)
    if args.readme:
        readme = ROOT / "README.md"
        content = readme.read_text()
        if BEGIN not in content or END not in content:
            raise ValueError(f"README.md lacks the markers {BEGIN} and {END}")
        before, rest = content.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        readme.write_text(before + BEGIN + "\n" + short_table(results) + END + after)
    print(text)
    print(f"total: {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
