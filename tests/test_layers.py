"""The rooms and their arrows: every import, lazy ones included, runs down the layers.

    osdface (command line), bench      top: may import everything below
    service (HTTP)                     never the command line
    train                              never the service or the command line
    weights, model                     the ground floor: never train, service or osdface

Read from the source with `ast`, so an import inside a function counts as much as one at the
top of a file. docs/architecture.md must name every package of the tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "weights", "service", "train", "osdface", "bench")
FORBIDDEN: dict[str, set[str]] = {
    "model": {"train", "service", "osdface", "bench", "tests"},
    "weights": {"train", "service", "osdface", "bench", "tests"},
    "train": {"service", "osdface", "bench", "tests"},
    "service": {"osdface", "train", "bench", "tests"},
    "osdface": {"bench", "tests"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def upward_imports(package: str) -> list[str]:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for top, line in imported_packages(path):
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {top}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_up_the_layers(package: str) -> None:
    assert upward_imports(package) == []


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from service.settings import Settings\n")
    assert ("service", 4) in imported_packages(module)


def packages_in_tree() -> list[str]:
    """Every folder of the production and bench code that holds Python modules."""
    folders = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            folders.add(path.parent.relative_to(REPO).as_posix())
    return sorted(folders)


def test_architecture_page_names_every_package() -> None:
    text = (REPO / "docs/architecture.md").read_text()
    missing = [folder for folder in packages_in_tree() if f"`{folder}/`" not in text]
    assert missing == [], f"docs/architecture.md does not name {missing}"
    assert "model/media/video" in packages_in_tree()  # the walk itself reaches nested rooms


MAX_LINES = 450  # a module past this holds more than one concern: split it by concern


def test_no_production_module_is_over_the_line_limit() -> None:
    long = [
        f"{path.relative_to(REPO)}: {n} lines"
        for package in FORBIDDEN
        for path in sorted((REPO / package).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert long == []
