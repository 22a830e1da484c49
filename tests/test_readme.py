"""The README is the front door: its Quickstart runs as written, its commands and links hold."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.MULTILINE | re.DOTALL)
    assert match, f"the README has no section {title!r}"
    return match.group(1)


def test_the_readme_is_an_adoption_page():
    assert len(README.splitlines()) <= 200
    titles = re.findall(r"^## (.+)$", README, re.MULTILINE)
    assert titles[:3] == ["Quickstart", "Install", "Two commands"]


def test_quickstart_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", section("Quickstart"), re.DOTALL)
    assert len(blocks) == 1
    out = subprocess.run(
        [sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    loss = float(re.fullmatch(r"loss after 50 steps: (\S+)\n", out.stdout).group(1))
    start = 1.0  # the target x0 * x1 of standard normals has variance 1
    assert loss < 0.5 * start


def test_the_two_commands_set_up_then_run_the_demo_and_the_tests():
    commands = re.findall(r"```bash\n(.*?)\n```", section("Two commands"), re.DOTALL)
    setup = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && "
    assert len(commands) == 2 and all(c.startswith(setup) for c in commands)
    assert "-m experiments.train gmm" in commands[0]
    assert commands[1].endswith(".venv/bin/python -m pytest tests")
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest tests" in ci


def test_local_links_point_at_files():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)|src=\"([^\"]+)\"", README)
    paths = [a or b for a, b in links if not (a or b).startswith("http")]
    assert paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README links to missing files: {missing}"
