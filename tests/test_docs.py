r"""The documentation site (``mkdocs.yml``, ``docs/``): its examples run, it builds, it renders.

* Every Markdown page under ``docs/`` (but ``docs/results/``) with a Python block is one
  test: its fenced ``python`` blocks run in order, in one namespace, in the repository root
  (where the pages' commands run; so they must not write files), in under 5 seconds per page.
  A block that must not run (it needs ``torchrun``, a GPU, or minutes) is marked by an HTML
  comment on the line just before its fence, which renders as nothing::

      <!-- no-run -->
      ```python
      process = setup()
      ```

  Other languages (``bash``, ``pycon``, ``text``) never run.
* ``mkdocs build --strict`` succeeds (skipped only if mkdocs is not installed).
* Headless Chromium renders the home page, the HyperNetwork API page and a guide: each has its
  ``h1`` and a code block in the DOM it renders, and a screenshot of each is written to
  ``$TORCHHYPER_DOCS_SCREENSHOTS`` (default: a pytest temporary folder). Skipped if no
  ``chromium`` is on PATH (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKDOWN = sorted(p for p in DOCS.rglob("*.md") if "results" not in p.relative_to(DOCS).parts)
FENCE = re.compile(
    r"(?P<mark><!-- no-run -->\n)?^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n"
    r"(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
SECONDS_PER_PAGE = 5.0


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """The ``python`` blocks of a page: ``(line, code, runs)``, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("lang") not in ("python", "py"):
            continue
        indent = len(match.group("indent"))
        code = "\n".join(line[indent:] for line in match.group("body").splitlines())
        line = text.count("\n", 0, match.start("body")) + 1
        blocks.append((line, code, match.group("mark") is None))
    return blocks


# The pages with Python examples (the API pages hold none: their examples are the docstrings').
PAGES = [p for p in MARKDOWN if "```python" in p.read_text()]


def test_fences_are_found():
    text = "a\n<!-- no-run -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(4, "x = 1", False), (8, "y = 2", True)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_examples_run(page: Path, monkeypatch: pytest.MonkeyPatch):
    blocks = [(line, code) for line, code, runs in python_blocks(page.read_text()) if runs]
    if not blocks:
        pytest.skip(f"{page.relative_to(ROOT)}: every Python block is marked <!-- no-run -->")
    import torch

    monkeypatch.chdir(ROOT)  # where the pages' commands run
    monkeypatch.syspath_prepend(str(ROOT))  # experiments is not installed
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs:{page.name}"}
    start = time.perf_counter()
    for line, code in blocks:
        where = f"{page.relative_to(ROOT)}:{line}"
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"the block at {where} raised {type(error).__name__}: {error}"
            ) from error
    seconds = time.perf_counter() - start
    assert seconds < SECONDS_PER_PAGE, (
        f"{page.relative_to(ROOT)}'s examples took {seconds:.1f} s; keep them under "
        f"{SECONDS_PER_PAGE} s (smaller models, fewer steps) or mark slow ones <!-- no-run -->"
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with ``mkdocs build --strict``."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return out


def test_site_builds_strict(site: Path):
    for page in ["index.html", "api/model.html", "guides/conditioning.html"]:
        assert (site / page).is_file(), f"{page} missing from the built site"
    heads = (site / "api/heads.html").read_text()
    # The registry table is generated from HEADS: every registered name shows up.
    from torchhyper.heads import HEADS

    missing = [name for name in HEADS if f"<code>{name}</code>" not in heads]
    assert not missing, f"registered heads missing from api/heads.html: {missing}"
    assert "<!-- registry:" not in heads


class _Page(HTMLParser):
    """The ``h1`` texts and the number of code blocks of a rendered DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.h1: list[str] = []
        self.code_blocks = 0
        self._in_h1 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h1":
            self._in_h1 = True
            self.h1.append("")
        elif tag == "pre":
            self.code_blocks += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._in_h1:
            self.h1[-1] += data


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.parametrize(
    ("page", "h1"),
    [
        ("index.html", "torchhyper"),
        ("api/model.html", "torchhyper.model"),
        ("guides/conditioning.html", "Three ways to condition"),
    ],
)
def test_chromium_renders(site: Path, page: str, h1: str, tmp_path_factory):
    chromium = _chromium()
    if chromium is None:
        message = "chromium is not on PATH; on Debian: apt-get install -y chromium"
        if os.environ.get("TORCHHYPER_REQUIRE_BROWSER"):  # CI installs it: never skip there
            pytest.fail(message)
        pytest.skip(message)
    shots = Path(
        os.environ.get("TORCHHYPER_DOCS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots")
    )
    shots.mkdir(parents=True, exist_ok=True)
    url = (site / page).as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    flags += ["--window-size=1280,1600", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, f"chromium --dump-dom {url} failed:\n{dom.stderr[-3000:]}"
    parsed = _Page()
    parsed.feed(dom.stdout)
    titles = [" ".join(t.split()).rstrip("¶").strip() for t in parsed.h1]
    assert h1 in titles, f"{page}: expected an h1 {h1!r}, Chromium rendered h1s {titles}"
    assert parsed.code_blocks >= 1, f"{page}: no code block in the DOM Chromium rendered"
    shot = shots / (page.replace("/", "-").removesuffix(".html") + ".png")
    result = subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, (
        f"chromium --screenshot {url} failed:\n{result.stderr[-3000:]}"
    )


def _hooks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.on_config({"docs_dir": str(DOCS)})
    return module


def test_registry_tables_follow_the_registries(monkeypatch: pytest.MonkeyPatch):
    from torch import nn

    from torchhyper.heads import HEADS, Head

    class Doubled(Head):
        """Twice the dense update. More text that the table leaves out."""

    monkeypatch.setitem(HEADS, "doubled", Doubled)
    hooks = _hooks()
    table = hooks._registry("heads", "test")
    assert "| `doubled` |" in table and "| Twice the dense update. |" in table
    assert "[`FiLMHead`][torchhyper.heads.FiLMHead]" in table

    import experiments

    class Task(nn.Module):
        """A made-up experiment."""

    monkeypatch.setattr(experiments, "EXPERIMENTS", {"made_up": Task}, raising=False)
    assert "| `made_up` |" in hooks._registry("experiments", "test")
