"""The package layers, checked on the source: every import points down (docs/architecture.md, "Layers").

    btd (composition root: the CLI)
    service (gateway)      worker (scoring, reports)      <- side by side, never importing each other
    core (foundation: settings, db, spool, queue, sender, observability, contracts)
    models (the science: imports nothing of ours)

Every import statement counts, also those inside functions (a lazy import is still an arrow), and so do
`importlib.import_module("...")` calls with a literal name, which is how an upward arrow used to hide.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = ("btd", "core", "models", "service", "worker", "migrations")

# What each package may import of ours (besides itself).
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "core": {"models"},
    "service": {"core", "models"},
    "worker": {"core", "models"},
    "migrations": {"core", "models"},
    "btd": {"core", "models", "service", "worker"},
}


def imported_modules(source: str) -> Iterator[tuple[int, str]]:
    """(line, dotted module name) of every import in `source`, nested ones and literal import_module calls too."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"import_module", "find_spec"} and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def violations(package: str, source: str, where: str) -> list[str]:
    found = []
    for line, module in imported_modules(source):
        top = module.split(".")[0]
        if top in OURS and top != package and top not in ALLOWED[package]:
            found.append(f"{where}:{line}: {package} imports {module}")
    return found


def package_sources(package: str) -> Iterator[Path]:
    yield from sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_import_of_the_package_points_down(package: str) -> None:
    sources = list(package_sources(package))
    assert sources, f"no sources found for {package}"
    found = [
        v for path in sources for v in violations(package, path.read_text(), str(path.relative_to(REPO)))
    ]
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_the_check_sees_upward_imports_however_they_are_written() -> None:
    """The checker itself: each form of an upward arrow that has existed in this code base is caught."""
    sneaky = (
        "from worker.celery_app import app\n"
        "def later():\n    import btd.cli\n"
        "import importlib\nimportlib.import_module('worker.tasks')\n"
    )
    assert len(violations("service", sneaky, "x.py")) == 3
    assert violations("core", "from service.api import app\n", "x.py")
    assert violations("worker", "from service import stability\n", "x.py")
    assert violations("models", "from core import contracts\n", "x.py")
    assert not violations("btd", "from worker import main\nfrom service import server\n", "x.py")
