"""The documentation keeps up with the code.

Every public name (each package's ``__all__``) has a docstring, public functions that take
arguments document them (Google-style ``Args:`` / ``Returns:``), every public name appears on its
package's API page, README.md stays a short front door, and every relative link in README.md and
docs/ points to a file that exists. The mkdocs build itself (``make docs``) checks the rendered site.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200

FRAMEWORKS = {"relattn_torch": "torch", "relattn_jax": "jax"}
API_PAGES = {"relattn_torch": DOCS / "api" / "torch.md", "relattn_jax": DOCS / "api" / "jax.md"}

def _package(module_name: str):
    pytest.importorskip(FRAMEWORKS[module_name])
    return importlib.import_module(module_name)


def _public(module_name: str) -> list[str]:
    """The names in ``__all__``, read from ``__init__.py`` without importing the framework."""
    source = (ROOT / module_name / "__init__.py").read_text()
    block = re.search(r"__all__\s*=\s*\[(.*?)\]", source, re.S)
    assert block, f"{module_name}/__init__.py has no __all__ list"
    return re.findall(r"[\"'](\w+)[\"']", block.group(1))


PUBLIC = [(m, n) for m in FRAMEWORKS for n in _public(m)]
PUBLIC_IDS = [f"{m}.{n}" for m, n in PUBLIC]


def _own_docstring(obj, name: str) -> str:
    """The object's own docstring: not inherited, not a dataclass's generated signature."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    doc = inspect.cleandoc(doc or "")
    if inspect.isclass(obj) and doc.startswith(f"{name}("):
        return ""
    return doc


def _has_section(doc: str, *titles: str) -> bool:
    return any(re.search(rf"^\s*{title}:\s*$", doc, re.M) for title in titles)


@pytest.mark.parametrize(("module_name", "name"), PUBLIC, ids=PUBLIC_IDS)
def test_public_name_has_a_docstring(module_name, name):
    obj = getattr(_package(module_name), name)
    assert _own_docstring(obj, name).strip(), f"{module_name}.{name} has no docstring"


@pytest.mark.parametrize(("module_name", "name"), PUBLIC, ids=PUBLIC_IDS)
def test_public_function_documents_args_and_returns(module_name, name):
    obj = getattr(_package(module_name), name)
    if not inspect.isfunction(obj):
        pytest.skip("not a function")
    signature = inspect.signature(obj)
    doc = _own_docstring(obj, name)
    if signature.parameters:
        assert _has_section(doc, "Args", "Arguments"), f"{module_name}.{name}: no Args: section"
    returns_none = signature.return_annotation in (None, "None")
    if not returns_none:
        assert _has_section(doc, "Returns", "Yields"), f"{module_name}.{name}: no Returns: section"


@pytest.mark.parametrize(("module_name", "name"), PUBLIC, ids=PUBLIC_IDS)
def test_public_name_is_on_its_api_page(module_name, name):
    page = API_PAGES[module_name]
    text = page.read_text()
    assert re.search(rf"\b{module_name}\.{name}\b", text), (
        f"{module_name}.{name} is not on {page.relative_to(ROOT)}; add '::: {module_name}.{name}'"
    )


def test_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines > {README_MAX_LINES}"


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def relative_links(markdown: str) -> list[str]:
    """Link and image targets that are relative paths (no scheme, not a bare #anchor)."""
    text = _INLINE_CODE.sub("", _FENCE.sub("", markdown))
    targets = _LINK.findall(text) + _REF_DEF.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", t, re.I)]


def test_relative_links_parser():
    text = "[a](docs/x.md#s) ![p](p.png) [w](https://x.org) [h](#top) `[c](no.md)`\n```\n[f](no.md)\n```\n[r]: y.md\n"
    assert relative_links(text) == ["docs/x.md#s", "p.png", "y.md"]


MARKDOWN_FILES = [README, *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN_FILES])
def test_relative_links_point_to_existing_files(path):
    broken = []
    for target in relative_links(path.read_text()):
        file_part = target.split("#", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"
