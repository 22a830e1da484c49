"""What every benchmark prints first: the commit, torch, threads, command and date it ran with."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["header"]


def header(threads: int | None = None) -> str:
    """A Markdown block recording how this run was made, to print above its tables.
    ``threads``: the threads each worker process runs with, if not this process's."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", *sys.argv])
    lines = [
        f"- command: `{command}`",
        f"- commit: {commit}; torch {torch.__version__}; Python {platform.python_version()}",
        f"- threads: {threads or torch.get_num_threads()} per process; {os.cpu_count()} CPUs; "
        f"glibc: {' '.join(f'{k}={v}' for k, v in malloc.items()) or 'defaults'}",
        f"- date: {when}",
    ]
    return "\n".join(lines) + "\n"
