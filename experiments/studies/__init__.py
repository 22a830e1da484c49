r"""Studies of the experiments: each script trains or samples registered runs many times to
answer one question; its results, with the command that made them, are a page of the docs
(``docs/results/<name>.md``).

    python -m experiments.studies.set_encoding   # the set-encoding features, one at a time
    python -m experiments.studies.ddpm_gap       # the DDPM's gap to the class-embedding UNet
    python -m experiments.studies.fd_noise RUN   # the noise of the DDPM's Fréchet distance

Each prints :func:`header` first, as the library's benchmarks do (``benchmarks/record.py``).
"""

from __future__ import annotations

import sys

from benchmarks.record import header as _header

__all__ = ["header"]


def header(threads: int | None = None) -> str:
    r"""``benchmarks/record.py``'s provenance block (the commit, torch, threads, command and
    date), its command as it was typed: ``python -m experiments.studies.NAME ...``.
    ``threads``: those of each worker process, if not this process's."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    argv = sys.argv
    if spec is not None:
        sys.argv = ["-m", spec.name, *argv[1:]]
    try:
        return _header(threads)
    finally:
        sys.argv = argv
