r"""MkDocs hook: tables generated at build time from the registries, so the docs never drift.

A page may hold these markers, each on its own line; each is replaced by a Markdown table:

* ``<!-- registry:heads -->``: ``torchhyper.heads.HEADS`` (name -> head class or factory);
* ``<!-- registry:pools -->``: ``torchhyper.pooling.POOLS`` (name -> Pool class);
* ``<!-- registry:experiments -->``: ``experiments.EXPERIMENTS`` (name -> ``Experiment``, shown
  by its task class and its summary);
* ``<!-- exports:torchhyper -->``: the names in ``torchhyper.__all__``;
* ``<!-- results:table -->``: ``docs/results/results.md``, the experiments' results table that
  ``python -m experiments.results`` writes, with its plots' paths made relative to the page.

Columns: the name, the object (linked to its API reference entry when it has one), and the
first sentence of its docstring. A newly registered head or pool shows up with no docs edit.

Loaded from ``mkdocs.yml`` (``hooks:``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- (registry|exports|results):([a-z_]+) -->$", re.MULTILINE)
ROLE = re.compile(r":(?:py:)?\w+:`~?([^`]+)`")
# Registries: marker name -> (module, attribute, what it must be).
REGISTRIES = {
    "heads": ("torchhyper.heads", "HEADS", "a dict name -> head class or factory"),
    "pools": ("torchhyper.pooling", "POOLS", "a dict name -> Pool class"),
    "experiments": (
        "experiments",
        "EXPERIMENTS",
        "a dict name -> Experiment (its __doc__: the experiment module's summary)",
    ),
}

_documented: set[str] = set()  # modules with an API page (a `::: module` line under docs/api/)
_entries: dict[int, str] = {}  # id(object) -> its path on an API page, e.g. torchhyper.heads.Head


def on_config(config: Any) -> Any:
    if str(ROOT) not in sys.path:  # `experiments` is not installed; it lives beside the docs
        sys.path.insert(0, str(ROOT))
    _documented.clear()
    for page in (Path(config["docs_dir"]) / "api").glob("*.md"):
        _documented.update(re.findall(r"^::: ([\w.]+)", page.read_text(), re.MULTILINE))
    _entries.clear()
    return config


def _api_entries() -> dict[int, str]:
    """Every documented object, by id: the names in ``__all__`` of the modules with a page (the
    deepest module wins, as ``torchhyper.heads.Head`` over ``torchhyper.Head``)."""
    if not _entries:
        for module_name in sorted(_documented, key=lambda m: m.count(".")):
            module = importlib.import_module(module_name)
            for name in getattr(module, "__all__", ()):
                obj = getattr(module, name, None)
                if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__doc__:
                    _entries[id(obj)] = f"{module_name}.{name}"
    return _entries


def first_sentence(obj: Any) -> str:
    """The first sentence of ``obj``'s own docstring, as Markdown on one line ('' if none)."""
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    doc = inspect.cleandoc(doc) if isinstance(doc, str) else ""
    paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    paragraph = ROLE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", paragraph)
    paragraph = paragraph.replace("``", "`")
    # Cut at the first '. ' outside code spans.
    ticks = 0
    for k, char in enumerate(paragraph):
        if char == "`":
            ticks += 1
        elif char == "." and ticks % 2 == 0 and paragraph[k + 1 : k + 2] in (" ", ""):
            word = paragraph[:k].rsplit(" ", 1)[-1]
            if word not in ("al", "e.g", "i.e", "vs", "etc"):  # not an abbreviation's dot
                return paragraph[: k + 1]
    return paragraph


def reference(obj: Any) -> str:
    """``obj`` as Markdown: an autorefs link to its API entry where it has one, else code."""
    if isinstance(obj, functools.partial):
        args = [reference(obj.func)] + [f"`{k}={v!r}`" for k, v in obj.keywords.items()]
        return "partial(" + ", ".join(args) + ")"
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        obj = type(obj)  # an instance: show its class
    entry = _api_entries().get(id(obj))
    if entry is not None:
        return f"[`{entry.rsplit('.', 1)[-1]}`][{entry}]"
    module = getattr(obj, "__module__", "") or ""
    return f"`{module}.{getattr(obj, '__qualname__', type(obj).__name__)}`"


def registry_table(entries: dict[str, Any]) -> str:
    rows = ["| name | class | what |", "| --- | --- | --- |"]
    for name, obj in entries.items():
        target = obj.func if isinstance(obj, functools.partial) else obj
        shown = getattr(obj, "task", obj)  # an Experiment: its task class
        rows.append(f"| `{name}` | {reference(shown)} | {first_sentence(target) or '—'} |")
    return "\n".join(rows)


def _registry(name: str, page: str) -> str:
    module_name, attribute, expected = REGISTRIES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RuntimeError(
            f"{page}: registry:{name} needs module {module_name}: {error}"
        ) from error
    entries = getattr(module, attribute, None)
    if not isinstance(entries, dict) or not entries:
        raise RuntimeError(
            f"{page}: registry:{name} expects {module_name}.{attribute} to be {expected}, "
            f"got {type(entries).__name__}"
        )
    return registry_table(entries)


def _exports(name: str, page: str) -> str:
    module = importlib.import_module(name)
    rows = ["| name | defined in | what |", "| --- | --- | --- |"]
    for export in module.__all__:
        obj = getattr(module, export)
        entry = _api_entries().get(id(obj))
        if entry is not None:
            home = entry.rsplit(".", 1)[0]
            link, where = f"[`{export}`][{entry}]", f"[`{home}`][{home}]"
        else:
            home = getattr(obj, "__module__", name)
            link, where = f"`{export}`", f"`{home}`"
        rows.append(f"| {link} | {where} | {first_sentence(obj) or '—'} |")
    return "\n".join(rows)


def _results(page: str) -> str:
    table = ROOT / "docs" / "results" / "results.md"
    if not table.is_file():
        raise RuntimeError(f"{page}: {table} is missing; run python -m experiments.results")
    up = "../" * page.count("/")
    return table.read_text().replace('src="docs/results/', f'src="{up}results/')


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    path = page.file.src_path

    def replace(match: re.Match[str]) -> str:
        kind, name = match.groups()
        if kind == "registry":
            if name not in REGISTRIES:
                raise RuntimeError(
                    f"{path}: unknown marker registry:{name}; known: {sorted(REGISTRIES)}"
                )
            return _registry(name, path)
        if kind == "results":
            return _results(path)
        return _exports(name, path)

    return MARKER.sub(replace, markdown)
