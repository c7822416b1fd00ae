"""The public API: `__all__` of regate_fx and regate_fx.runtime lists what README.md and docs/ use.

Every advertised name imports; every `regate_fx.X` (or `from regate_fx import X`) in a code block of
the README or the docs is advertised (or is a subpackage, or a trainer imported on first use); the
package `__init__` files import explicitly (no star imports).
"""

import importlib.util
import re
from pathlib import Path

import pytest

import regate_fx
import regate_fx.runtime

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"```\w*\n(.*?)```", re.S)


def _code_names(text: str) -> set[str]:
    names: set[str] = set()
    for block in _BLOCK.findall(text):
        names |= set(re.findall(r"\bregate_fx\.(\w+)", block))
        for group in re.findall(r"from regate_fx import \(?([\w, \n]+)\)?", block):
            names |= {n.strip() for n in group.replace("\n", ",").split(",") if n.strip()}
    return names


def _is_submodule(name: str) -> bool:
    return importlib.util.find_spec(f"regate_fx.{name}") is not None


@pytest.mark.parametrize("module", [regate_fx, regate_fx.runtime], ids=lambda m: m.__name__)
def test_every_advertised_name_imports(module):
    assert len(module.__all__) == len(set(module.__all__)), "a name is listed twice"
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_runtime_api_is_part_of_the_package_api():
    assert set(regate_fx.runtime.__all__) <= set(regate_fx.__all__)


def test_lazy_trainers_resolve():
    for name in ("ReGateTrainer", "ReGateTrainerMixin"):
        assert name in regate_fx.__all__
        assert isinstance(getattr(regate_fx, name), type)
    with pytest.raises(AttributeError):
        regate_fx.not_a_name  # noqa: B018


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_names_the_docs_use_are_advertised(doc):
    missing = sorted(
        n
        for n in _code_names(doc.read_text())
        if n not in regate_fx.__all__ and n not in regate_fx._LAZY and n != "__version__" and not _is_submodule(n)
    )
    assert not missing, f"{doc.name} uses regate_fx names that __all__ does not list: {missing}"


def test_the_runtime_table_is_advertised():
    """docs/runtime.md's table of the runtime API: each name in its first column is in runtime.__all__
    (or the package's, for the graph-side and trainer names it lists too)."""
    lines = (ROOT / "docs" / "runtime.md").read_text().splitlines()
    start = lines.index("| name | what |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1])
    names = {m for cell in rows for m in re.findall(r"`([A-Za-z_]\w*)", cell)}
    assert names, "no table found"
    missing = sorted(n for n in names if n not in regate_fx.__all__ and n not in regate_fx._LAZY)
    assert not missing, missing


@pytest.mark.parametrize("init", ["regate_fx/__init__.py", "regate_fx/runtime/__init__.py"])
def test_no_star_imports(init):
    assert not re.search(r"^from \S+ import \*", (ROOT / init).read_text(), re.M)
