"""Generate (or check) the "Options" table of every method's docs page from the method's ``Config``.

Every registered method (``virtnet.methods.method_names()``) has a page ``docs/methods/<name>.md`` with a
section headed ``## Options`` holding a table ``| key | type | default | meaning |``: one row per field of
the method's pydantic ``Config``, in field order. This script rewrites that table in place: key, type
and default come from the ``Config``; the meaning is kept from the page's current row for that key, else
taken from the comment on (or just above) the field in the config's source, else left as ``TODO``. Prose
before and after the table in the section is kept. A page without an ``## Options`` section gets one
appended at its end.

    python tools/gen_option_tables.py            # rewrite the tables
    python tools/gen_option_tables.py --check    # exit 1 and name the pages whose table is out of date

``tests/test_docs.py`` uses :func:`render_default`, :func:`parse_options` and :func:`options_section`
from here, so the test and the generator read and write defaults the same way.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "methods"
HEADING = "## Options"
HEADER = "| key | type | default | meaning |"
SEPARATOR = "|---|---|---|---|"
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


# ---- rendering -----------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def default_value(field: Any) -> Any:
    """A pydantic field's default (its factory called when it has one)."""
    if field.default_factory is not None:
        return field.default_factory()
    return field.default


def render_default(value: Any) -> str:
    """A default as shown in the table: a string as it is, anything else as JSON (``null``, ``true``,
    ``0.5``, ``[[8000, 0.002], [null, 0.0001]]``), in backticks."""
    text = value if isinstance(value, str) else json.dumps(_jsonable(value))
    return f"`{text}`"


def render_type(ann: Any) -> str:
    """An annotation in words: ``int``, ``float or null``, ``list[str]``, one of ``\\`a\\`, \\`b\\```."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Literal:
        return ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [render_type(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(parts)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else render_type(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(ann, "__name__", str(ann))


# ---- reading a page -------------------------------------------------------------------------------------
def cells(row: str) -> list[str]:
    """The cells of a markdown table row (``\\|`` inside a cell is not a separator)."""
    parts = _CELL_SPLIT.split(row.strip())
    return [c.strip() for c in parts[1:-1]]


def options_section(text: str) -> tuple[int, int] | None:
    """Line range ``[start, end)`` of the ``## Options`` section (heading excluded), or None."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(HEADING)), None)
    if start is None:
        return None
    end = next((j for j in range(start + 1, len(lines)) if re.match(r"#{1,2} ", lines[j])), len(lines))
    return start + 1, end


def _table_range(lines: list[str], start: int, end: int) -> tuple[int, int] | None:
    first = next((i for i in range(start, end) if lines[i].lstrip().startswith("|")), None)
    if first is None:
        return None
    last = first
    while last < end and lines[last].lstrip().startswith("|"):
        last += 1
    return first, last


def strip_code(cell: str) -> str:
    """A cell without one pair of enclosing backticks."""
    return cell[1:-1] if len(cell) >= 2 and cell[0] == cell[-1] == "`" else cell


def parse_options(text: str) -> dict[str, dict[str, str]] | None:
    """The rows of the page's Options table, ``{key: {"type", "default", "meaning"}}`` (key without
    backticks; the other cells as written), or None when the page has no Options section or table."""
    section = options_section(text)
    if section is None:
        return None
    lines = text.splitlines()
    table = _table_range(lines, *section)
    if table is None:
        return None
    rows = [cells(line) for line in lines[table[0] : table[1]]]
    header = [c.lower() for c in rows[0]]
    out: dict[str, dict[str, str]] = {}
    for row in rows[2:]:
        entry = dict(zip(header, row, strict=False))
        out[strip_code(entry.get("key", ""))] = {k: entry.get(k, "") for k in ("type", "default", "meaning")}
    return out


# ---- the config's own comments ---------------------------------------------------------------------------
def source_comments(config: type) -> dict[str, str]:
    """Per field, the comment on its line or the comment lines just above it, in the class source of
    ``config`` or of its bases (the nearest class wins)."""
    found: dict[str, str] = {}
    for cls in reversed(config.__mro__):
        if not cls.__module__.startswith("virtnet."):
            continue
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        found.update(_comments_of(src))
    return found


def _comments_of(src: str) -> dict[str, str]:
    lines = src.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for no, line in enumerate(lines, start=1):
        m = re.match(r"    (\w+)\s*:", line)
        if not m or line.lstrip().startswith("#"):
            continue
        if no in comments:
            out[m.group(1)] = comments[no]
            continue
        above = []
        k = no - 1
        while k >= 1 and lines[k - 1].lstrip().startswith("#"):
            above.insert(0, comments.get(k, ""))
            k -= 1
        if above:
            out[m.group(1)] = " ".join(above)
    return out


# ---- writing ------------------------------------------------------------------------------------------
def table_rows(name: str, old: dict[str, dict[str, str]] | None) -> list[str]:
    from virtnet.methods import get_method_class

    config = get_method_class(name).Config
    comments = source_comments(config)
    rows = [HEADER, SEPARATOR]
    for key, field in config.model_fields.items():
        meaning = (old or {}).get(key, {}).get("meaning") or comments.get(key) or "TODO"
        meaning = meaning.replace("|", "\\|") if "\\|" not in meaning else meaning
        typ = render_type(field.annotation).replace("|", "\\|")
        rows.append(f"| `{key}` | {typ} | {render_default(default_value(field))} | {meaning} |")
    return rows


def updated_page(name: str, text: str) -> str:
    """``text`` (a method's page) with its Options table made from the method's Config."""
    old = parse_options(text)
    rows = table_rows(name, old)
    lines = text.splitlines()
    section = options_section(text)
    if section is None:
        lines += ["", f"{HEADING} (`method:` section)", "", *rows]
    else:
        table = _table_range(lines, *section)
        if table is None:
            lines[section[0] : section[0]] = ["", *rows, ""]
        else:
            lines[table[0] : table[1]] = rows
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    from virtnet.methods import method_names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date pages (exit 1)")
    args = parser.parse_args(argv)
    stale = []
    for name in method_names():
        page = DOCS / f"{name}.md"
        text = page.read_text(encoding="utf-8") if page.is_file() else f"# `{name}`\n"
        new = updated_page(name, text)
        if new != text:
            stale.append(page)
            if not args.check:
                page.write_text(new, encoding="utf-8")
    for page in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {page.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
