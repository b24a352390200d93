"""A griffe extension that lets mkdocstrings render flowsolve's docstrings as written.

flowsolve's docstrings use Google sections (``Args:``, ``Returns:``, ``Attributes:``) for the
structure and reStructuredText for the inline markup, because they are read in ``help()``
and in an editor first. This extension rewrites, at documentation-build time only, the few
reST constructs that Markdown would otherwise garble:

* ``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:data:``, ``:mod:``, ``:attr:``, ``:exc:`` roles
  become code spans linked to the API page of their target when it is rendered (an
  optional cross-reference: an unknown target stays plain code, never a warning);
* ``:math:`...``` and ``.. math::`` blocks become arithmatex ``$...$`` and ``$$...$$``;
* doctest blocks (``>>>`` lines and their output) become fenced ``python`` code blocks
  (Markdown would read ``>>>`` as nested block quotes);
* reST simple tables (``====  ====`` borders) become Markdown pipe tables;
* a paragraph ending in ``::`` (a reST literal block follows) ends in ``:``; the literal
  block becomes a fenced ``python`` block (coloured) when it is Python (it parses), else it
  stays an indented, plain one (most are formulas in plain text);
* an ``Attributes:`` item naming several attributes (``times, trajectory: ...``), which the
  Google parser reads as a name and a type (``times,`` of type ``trajectory``), becomes one
  item per name with the same description (each then gets its own annotation). ``Args:``
  items such as ``t0, t1: ...`` are read as one name and need no rewriting.

The source files are not touched; the doctests still run from them.
"""

from __future__ import annotations

import ast
import re
import textwrap

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_BORDER = re.compile(r"^(?P<indent>\s*)=+(?:\s+=+)+\s*$")
_DOCTEST = re.compile(r"^(?P<indent>\s*)>>>")
_SECTION = re.compile(r"^\s*[A-Za-z][\w ]*:\s*$")  # "Example:": its body must follow at once
_ATTRIBUTES = re.compile(r"^(?P<indent>\s*)Attributes:\s*$")
_NAMES_ITEM = re.compile(r"^(?P<names>\w+(?:\s*,\s*\w+)+)\s*:(?P<rest>.*)$")


def _lookup(scope: griffe.Object, dotted: str) -> str | None:
    """The canonical path of ``dotted`` looked up from ``scope``, or None."""
    try:
        found = scope[dotted]
    except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError,
            griffe.CyclicAliasError):
        return None
    try:
        return found.final_target.path if found.is_alias else found.path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _resolve(target: str, obj: griffe.Object) -> str | None:
    target = target.strip().removesuffix("()").lstrip(".")
    package = obj.package
    if target == package.name:
        return package.path
    if target.startswith(package.name + "."):
        return _lookup(package, target[len(package.name) + 1:])
    scope: griffe.Object | None = obj
    while scope is not None:  # the object itself, its class, its module, the package
        if (path := _lookup(scope, target)) is not None:
            return path
        scope = scope.parent
    return None


def _roles(text: str, obj: griffe.Object) -> str:
    def link(match: re.Match) -> str:
        short, target = match[1] == "~", match[2].strip()
        title = target.removesuffix("()").rsplit(".", 1)[-1] if short else target
        code = f"<code>{title}</code>"
        identifier = _resolve(target, obj)
        if identifier is None:
            return code
        return f'<autoref identifier="{identifier}" optional>{code}</autoref>'

    text = _MATH_ROLE.sub(lambda m: f"${m[1]}$", text)
    return _ROLE.sub(link, text)


def _math_blocks(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            indent = line[: len(line) - len(line.lstrip())]
            body, i = [], i + 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            out += [indent + "$$", *(indent + b for b in body if b), indent + "$$", ""]
            continue
        out.append(line)
        i += 1
    return out


def _doctests(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        match = _DOCTEST.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        block = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(lines[i][len(indent):])
            i += 1
        if out and out[-1].strip() and not _SECTION.match(out[-1]):
            out.append("")
        out += [indent + "```python", *(indent + b for b in block), indent + "```"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _attribute_items(lines: list[str]) -> list[str]:
    """Split ``a, b: text`` items of ``Attributes:`` sections into ``a: text`` and
    ``b: text`` (continuation lines repeated with each)."""
    out, i = [], 0
    while i < len(lines):
        out.append(lines[i])
        section = _ATTRIBUTES.match(lines[i])
        i += 1
        if not section:
            continue
        item_indent = None
        while i < len(lines) and (not lines[i].strip()
                                  or _indent(lines[i]) > len(section["indent"])):
            line = lines[i]
            if item_indent is None and line.strip():
                item_indent = _indent(line)
            match = _NAMES_ITEM.match(line.strip()) if _indent(line) == item_indent else None
            if not match:
                out.append(line)
                i += 1
                continue
            body, i = [], i + 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > item_indent:
                body.append(lines[i])
                i += 1
            for name in re.split(r"\s*,\s*", match["names"]):
                out += [f"{line[:item_indent]}{name}:{match['rest']}", *body]
    return out


def _literal_blocks(lines: list[str]) -> list[str]:
    """A reST literal block (indented, after a line ending in ``::``) that parses as Python
    becomes a fenced ``python`` block at the indentation of the line that announced it."""
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if not line.rstrip().endswith("::") or line.lstrip().startswith(".. "):
            continue  # not a literal block, or a directive's body (``.. math::``)
        start = i
        while start < len(lines) and not lines[start].strip():
            start += 1
        if start == i or start == len(lines) or _indent(lines[start]) <= _indent(line):
            continue
        end = start
        while end < len(lines) and (not lines[end].strip()
                                    or _indent(lines[end]) > _indent(line)):
            end += 1
        while not lines[end - 1].strip():
            end -= 1
        block = textwrap.dedent("\n".join(lines[start:end]))
        try:
            ast.parse(block)
        except SyntaxError:
            continue
        indent = line[: _indent(line)]
        out += ["", indent + "```python", *(indent + b if b else b for b in block.split("\n")),
                indent + "```"]
        i = end
    return out


def _cells(line: str, starts: list[int]) -> list[str]:
    """Split a table row into cells: runs of 2+ spaces separate cells; each piece goes to
    the column whose start is at or before it (text may overflow its column)."""
    cells = [""] * len(starts)
    for piece in re.finditer(r"\S+(?: \S+)*", line):
        col = max(k for k, s in enumerate(starts) if s <= piece.start() or k == 0)
        cells[col] = f"{cells[col]} {piece[0]}".strip()
    return cells


def _tables(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        match = _BORDER.match(lines[i])
        borders = [k for k in range(i, len(lines)) if _BORDER.match(lines[k])][:3]
        if not match or len(borders) < 3:
            out.append(lines[i])
            i += 1
            continue
        starts = [m.start() for m in re.finditer(r"=+", lines[i])]
        rows: list[list[str]] = []
        for k in range(i + 1, borders[2]):
            if k == borders[1] or not lines[k].strip():
                continue
            cells = _cells(lines[k], starts)
            if rows and not cells[0] and k != i + 1:
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
            else:
                rows.append(cells)
        indent = match["indent"]
        header, body = rows[0], rows[1:]
        if out and out[-1].strip():
            out.append("")
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + " --- |" * len(header))
        out += [indent + "| " + " | ".join(r) + " |" for r in body]
        out.append("")
        i = borders[2] + 1
    return out


def rewrite(text: str, obj: griffe.Object) -> str:
    """The Markdown mkdocstrings renders for the docstring ``text`` of ``obj``."""
    lines = text.splitlines()
    lines = _tables(_doctests(_math_blocks(_literal_blocks(_attribute_items(lines)))))
    text = "\n".join(lines)
    text = re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)
    return _roles(text, obj)


class RstDocstrings(griffe.Extension):
    """Rewrite every docstring of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj)
            stack += [m for m in obj.members.values() if not m.is_alias]
