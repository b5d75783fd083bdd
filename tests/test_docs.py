"""The docs follow the code: every registered method (``method_names()``, no hand list) has its page
``docs/methods/<name>.md`` whose Options table lists exactly its ``Config``'s fields with their defaults;
method pages and the architecture page name only modules that exist and link only to files in the
repository; README's methods table links each method's own page.

Defaults are rendered by ``tools/gen_option_tables.py`` (``render_default``), the script that writes the
tables: run ``python tools/gen_option_tables.py`` after changing a ``Config``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from virtnet.methods import get_method_class, method_names

ROOT = Path(__file__).resolve().parents[1]
METHOD_DOCS = ROOT / "docs" / "methods"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
EXAMPLE = "mymethod"  # the example method of docs/architecture.md ("how to add a method"): not in the code


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_option_tables", ROOT / "tools" / "gen_option_tables.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()
NAMES = method_names()
OWN_PAGES = [*sorted(METHOD_DOCS.glob("*.md")), ARCHITECTURE]


def _page(name: str) -> Path:
    return METHOD_DOCS / f"{name}.md"


def test_the_registry_is_not_empty():
    assert len(NAMES) >= 1


@pytest.mark.parametrize("name", NAMES)
def test_every_method_has_its_page(name):
    assert _page(name).is_file(), f"method '{name}' has no docs page docs/methods/{name}.md"


@pytest.mark.parametrize("name", NAMES)
def test_options_table_lists_exactly_the_config_fields(name):
    page = _page(name)
    if not page.is_file():
        pytest.fail(f"method '{name}' has no docs page docs/methods/{name}.md")
    rows = gen.parse_options(page.read_text(encoding="utf-8"))
    assert rows is not None, f"{page.name}: no '## Options' section with a table"
    fields = get_method_class(name).Config.model_fields
    missing = sorted(set(fields) - set(rows))
    extra = sorted(set(rows) - set(fields))
    assert not missing and not extra, (
        f"{page.name}: options not documented {missing}, documented but not in the Config {extra} "
        "(python tools/gen_option_tables.py)"
    )


@pytest.mark.parametrize("name", NAMES)
def test_options_table_shows_the_config_defaults_and_a_meaning(name):
    page = _page(name)
    if not page.is_file():
        pytest.fail(f"method '{name}' has no docs page docs/methods/{name}.md")
    rows = gen.parse_options(page.read_text(encoding="utf-8")) or {}
    for key, field in get_method_class(name).Config.model_fields.items():
        if key not in rows:
            continue  # reported by the test above
        shown = rows[key]["default"]
        expected = gen.render_default(gen.default_value(field))
        assert shown == expected, (
            f"{page.name}: option '{key}' shows default {shown}, the Config's is {expected}"
        )
        meaning = rows[key]["meaning"].strip()
        assert meaning and meaning != "TODO", f"{page.name}: option '{key}' has no meaning"


@pytest.mark.parametrize("name", NAMES)
def test_options_table_shows_the_config_types(name):
    page = _page(name)
    if not page.is_file():
        pytest.fail(f"method '{name}' has no docs page docs/methods/{name}.md")
    rows = gen.parse_options(page.read_text(encoding="utf-8")) or {}
    for key, field in get_method_class(name).Config.model_fields.items():
        if key in rows:
            expected = gen.render_type(field.annotation).replace("|", "\\|")
            assert rows[key]["type"] == expected, f"{page.name}: option '{key}' type {rows[key]['type']}"


def test_the_table_parser_and_renderer():
    text = "\n".join(
        [
            "# x",
            "## Options (`method:` section)",
            "intro",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
            "| `a` | float or null | `null` | one \\| two |",
            "| `b` | `p`, `q` | `p` | b |",
            "",
            "## Next",
            "| key | z |",
        ]
    )
    rows = gen.parse_options(text)
    assert set(rows) == {"a", "b"}
    assert rows["a"] == {"type": "float or null", "default": "`null`", "meaning": "one \\| two"}
    assert [gen.render_default(v) for v in (None, True, 0.5, 1e-3, "x", [(1, None)])] == [
        "`null`",
        "`true`",
        "`0.5`",
        "`0.001`",
        "`x`",
        "`[[1, null]]`",
    ]
    assert gen.parse_options("# x\n\n## Other\n") is None


def test_no_page_lacks_a_method():
    """Every page named like a method is one (a renamed method leaves no stale page behind); index pages
    without an Options section are allowed."""
    for page in METHOD_DOCS.glob("*.md"):
        if gen.parse_options(page.read_text(encoding="utf-8")) is not None:
            assert page.stem in NAMES, (
                f"{page.name} has an Options table but no method is called '{page.stem}'"
            )


# ---- references ----------------------------------------------------------------------------------------
_DOTTED = re.compile(r"(?<![\w./-])virtnet(?:\.[A-Za-z_]\w*)+")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_SRC = re.compile(r"(?<![\w./-])src/virtnet(?:/[\w.-]+)*/?")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", OWN_PAGES, ids=lambda p: p.name)
def test_dotted_names_exist(page):
    text = page.read_text(encoding="utf-8")
    names = {d.rstrip(".") for d in _DOTTED.findall(text) if EXAMPLE not in d}
    bad = sorted(d for d in names if not _resolves(d))
    assert not bad, f"{page.name} names what does not exist: {bad}"


@pytest.mark.parametrize("page", OWN_PAGES, ids=lambda p: p.name)
def test_source_paths_exist(page):
    text = page.read_text(encoding="utf-8")
    bad = sorted({p for p in _SRC.findall(text) if EXAMPLE not in p and not (ROOT / p).exists()})
    assert not bad, f"{page.name} names paths that do not exist: {bad}"


@pytest.mark.parametrize("page", OWN_PAGES, ids=lambda p: p.name)
def test_links_stay_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "PITFALLS" not in text, (
        f"{page.name} refers to a file outside the repository"
    )
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name}: link {target} leaves the repository"
        assert path.exists(), f"{page.name}: link {target} does not exist"


def test_architecture_examples_compile():
    blocks = re.findall(r"```python\n(.*?)```", ARCHITECTURE.read_text(encoding="utf-8"), re.S)
    assert blocks
    for i, block in enumerate(blocks):
        compile(block, f"architecture.md block {i}", "exec")


def test_readme_methods_table_links_each_methods_own_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    seen = set()
    for line in text.splitlines():
        m = re.match(r"\|[^|]*\| `([\w-]+)` \|", line)
        if not m or m.group(1) not in NAMES:
            continue
        name = m.group(1)
        seen.add(name)
        link = f"(docs/methods/{name}.md)"
        assert link in line, f"README: the row of '{name}' does not link docs/methods/{name}.md"
    assert seen == set(NAMES), f"README's methods table lacks {sorted(set(NAMES) - seen)}"
