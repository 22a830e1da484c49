"""What every benchmark prints first: the commit, torch, threads, command and date it ran with."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["header", "reset_peak", "resident_mb"]


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
    command = shlex.join(["python", *sys.argv])
    lines = [
        f"- command: `{command}`",
        f"- commit: {commit}; torch {torch.__version__}; Python {platform.python_version()}",
        f"- threads: {threads or torch.get_num_threads()} per process; {os.cpu_count()} CPUs; "
        f"glibc: {' '.join(f'{k}={v}' for k, v in malloc.items()) or 'defaults'}",
        f"- date: {when}",
    ]
    return "\n".join(lines) + "\n"


def resident_mb(field: str) -> float:
    """A memory field of ``/proc/self/status`` (Linux), e.g. ``VmRSS`` or ``VmHWM``, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> float:
    """Resets the process's peak resident size (``VmHWM``) to the current one (Linux), so that a
    later ``resident_mb("VmHWM")`` is the peak since now; returns the current size, MiB."""
    before = resident_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return before
