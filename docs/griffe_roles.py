r"""A Griffe extension: the reST in torchhyper's docstrings, as Markdown for mkdocstrings.

The docstrings are Google style with a few Sphinx/reST constructs; rendered as Markdown they
would show as raw text. This rewrites, in every docstring of the loaded package:

* roles, ``:class:`~torchhyper.heads.FiLMHead``` or ``:meth:`text <target>``` -> an autorefs
  link ``[`FiLMHead`][torchhyper.heads.FiLMHead]`` when the target is rendered in the API
  reference (public and documented), else inline code;
* a paragraph ending in ``::`` followed by an indented block -> a fenced Python code block;
* doctest lines (``>>>``, until a blank line) -> a fenced ``pycon`` block;
* line blocks (``| text`` lines, used under ``References:``) -> lines with hard breaks;
* simple tables (``====  ====`` borders) -> Markdown tables.

Loaded from ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|meth|func|data|attr|mod|obj|exc):`([^`]+)`")
BORDER = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")


def _resolve(obj: griffe.Object, target: str, root: griffe.Module) -> griffe.Object | None:
    """The object ``target`` names, seen from ``obj`` (full path, or a name in its scope)."""
    candidates = [target]
    head, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            resolved = scope.resolve(head)
        except Exception:  # noqa: BLE001 - a name not in this scope
            resolved = None
        if resolved:
            candidates.append(f"{resolved}.{rest}" if rest else resolved)
            break
        scope = scope.parent
    for path in candidates:
        try:
            found = root.modules_collection[path]
        except Exception:  # noqa: BLE001 - not a loaded object
            continue
        try:
            return found.final_target if found.is_alias else found
        except Exception:  # noqa: BLE001 - an alias to something not loaded (torch)
            return None
    return None


def _rendered(target: griffe.Object) -> bool:
    """Whether mkdocstrings renders ``target``: public all along its path, and documented."""
    parts = target.path.split(".")
    if any(p.startswith("_") for p in parts):
        return False
    if not target.path.startswith("torchhyper"):
        return False
    return target.is_module or target.docstring is not None


def _roles(text: str, obj: griffe.Object, root: griffe.Module) -> str:
    def replace(match: re.Match[str]) -> str:
        body = match.group(2).strip()
        explicit = re.fullmatch(r"(.+?)\s*<([^>]+)>", body)
        if explicit:
            shown, target = explicit.group(1), explicit.group(2)
        else:
            target = body.lstrip("~")
            shown = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        found = _resolve(obj, target, root)
        if found is not None and _rendered(found):
            return f"[`{shown}`][{found.path}]"
        return f"`{shown}`"

    return ROLE.sub(replace, text)


def _literal_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            indent = len(line) - len(line.lstrip())
            j = i + 2
            block: list[str] = []
            while j < len(lines) and (
                not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
            ):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            if block:
                cut = min(len(b) - len(b.lstrip()) for b in block if b.strip())
                text = line.rstrip()[:-2].rstrip()
                pad = " " * indent
                out += [pad + (text + ":" if text and not text.endswith(":") else text), ""]
                out += [pad + "```python", *(pad + b[cut:] for b in block), pad + "```", ""]
                i = j
                continue
        out.append(line)
        i += 1
    return out


def _doctests(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        j = i
        while j < len(lines) and lines[j].strip():
            j += 1
        pad = " " * indent
        out += [pad + "```pycon", *(pad + line[indent:] for line in lines[i:j]), pad + "```"]
        i = j
    return out


def _line_blocks(lines: list[str]) -> list[str]:
    out = []
    for k, line in enumerate(lines):
        m = re.match(r"^(\s*)\| (.*)$", line)
        if m and "|" not in m.group(2):
            following = k + 1 < len(lines) and re.match(r"^\s*\| ", lines[k + 1])
            out.append(m.group(1) + m.group(2) + ("  " if following else ""))
        else:
            out.append(line)
    return out


def _tables(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = BORDER.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        border = lines[i]
        spans = [(s.start(), s.end()) for s in re.finditer(r"=+", border)]
        rows: list[list[str]] = []
        borders = 1
        j = i + 1
        while j < len(lines) and borders < 3:
            if BORDER.match(lines[j]):
                borders += 1
                if borders == 2:
                    rows.append(["---"] * len(spans))
            elif lines[j].strip():
                cells = []
                for k, (start, _) in enumerate(spans):
                    stop = spans[k + 1][0] if k + 1 < len(spans) else None
                    cells.append(lines[j][start:stop].strip())
                if rows and rows[-1][0] != "---" and not cells[0]:
                    rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
                else:
                    rows.append(cells)
            j += 1
        pad = m.group(1)
        out += [pad + "| " + " | ".join(r) + " |" for r in rows]
        i = j
    return out


def _markdown(text: str, obj: griffe.Object, root: griffe.Module) -> str:
    lines = _tables(_line_blocks(_doctests(_literal_blocks(text.splitlines()))))
    return _roles("\n".join(lines), obj, root)


def _objects(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class SphinxToMarkdown(griffe.Extension):
    """Rewrites every docstring of a package once it is loaded (names then resolve)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _markdown(obj.docstring.value, obj, pkg)
