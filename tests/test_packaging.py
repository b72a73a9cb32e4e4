"""Packaging: the serving install carries no training or test tools, and every pin has one home.

`requirements.lock` is what serving needs (the Dockerfile installs only it); the `train` and `dev`
extras' pins live in `requirements-dev.lock` (which includes the first with `-r`). The checks read
the files themselves, the installed distributions' metadata (for the dependency closure) and a
wheel built offline from a copy of the project.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = REPO / "requirements.lock"
DEV_LOCK = REPO / "requirements-dev.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
SELF = canonicalize_name(PROJECT["name"])

# Named by hand as well as derived from the extras, so emptying an extra cannot hide a tool.
TOOLS = {"pytest", "selenium", "ruff", "mypy", "tensorboard", "httpx", "scikit-image"}


def read_lock(path: Path) -> tuple[dict[str, str], list[str]]:
    """({canonical name: version}, the `-r` includes); anything but `name==version` fails."""
    pins: dict[str, str] = {}
    includes = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            includes.append(line[3:].strip())
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._\-]*)==([A-Za-z0-9.+!\-]+)", line)
        assert m, f"{path.name}: not an exact pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = m.group(2)
    return pins, includes


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def extra(name: str) -> list[str]:
    return PROJECT["optional-dependencies"][name]


def tools() -> set[str]:
    return TOOLS | names(extra("dev")) - {SELF} | {"tensorboard"}


def closure(requirements: list[str]) -> set[str]:
    """Canonical names of everything these requirements pull in, from the installed metadata.

    Markers are evaluated for this interpreter and platform (Linux, CPython 3.11: the target),
    with the extras each requirement asks for; the project itself is expanded through its
    pyproject, not through whatever copy of it is installed.
    """
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [Requirement(r) for r in requirements]
    found: set[str] = set()
    while stack:
        req = stack.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        found.add(name)
        if name == SELF:
            stack += [Requirement(r) for r in PROJECT["dependencies"]]
            stack += [Requirement(r) for e in extras for r in extra(e)]
            continue
        try:
            requires = distribution(req.name).requires or []
        except PackageNotFoundError:
            pytest.skip(f"{req.name} is not installed here: cannot follow its requirements")
        for text in requires:
            sub = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                stack.append(sub)
    return found


def test_lock_reader_refuses_loose_pins(tmp_path: Path) -> None:
    good = tmp_path / "good.lock"
    good.write_text("# c\n-r other.lock\nFoo_Bar==1.0\nzed==2.0.post1\n")
    assert read_lock(good) == ({"foo-bar": "1.0", "zed": "2.0.post1"}, ["other.lock"])
    for text in ("foo>=1\n", "foo\n", "foo==1\nFOO==2\n"):
        bad = tmp_path / "bad.lock"
        bad.write_text(text)
        with pytest.raises(AssertionError):
            read_lock(bad)


def test_locks_are_sorted_and_split_without_overlap() -> None:
    runtime, runtime_includes = read_lock(RUNTIME_LOCK)
    dev, dev_includes = read_lock(DEV_LOCK)
    assert runtime_includes == []
    assert dev_includes == [RUNTIME_LOCK.name], "the dev lock builds on the runtime lock"
    assert runtime.keys() & dev.keys() == set(), "a package is pinned in one lock only"
    for path in (RUNTIME_LOCK, DEV_LOCK):
        listed = [
            line.split("==")[0].lower()
            for line in path.read_text().splitlines()
            if "==" in line and not line.startswith("#")
        ]
        assert listed == sorted(listed), f"{path.name} is not sorted by name"


def test_runtime_lock_has_no_training_or_test_tools() -> None:
    runtime, _ = read_lock(RUNTIME_LOCK)
    dev, _ = read_lock(DEV_LOCK)
    assert tools() & runtime.keys() == set()
    assert tools() <= dev.keys(), "every tool is pinned in the dev lock"
    assert names(PROJECT["dependencies"]) & tools() == set()


def test_every_dependency_is_pinned_in_the_right_lock() -> None:
    runtime, _ = read_lock(RUNTIME_LOCK)
    dev, _ = read_lock(DEV_LOCK)
    for text in PROJECT["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in runtime, f"{name} (a runtime dependency) is missing from requirements.lock"
        assert req.specifier.contains(runtime[name]), f"{text} vs {name}=={runtime[name]}"
    for group in PROJECT["optional-dependencies"]:
        for text in extra(group):
            name = canonicalize_name(Requirement(text).name)
            if name != SELF:
                assert name in runtime or name in dev, f"{name} ({group} extra) is pinned nowhere"


def test_the_locks_hold_the_whole_dependency_closure() -> None:
    """A transitive dependency missing from a lock is what a fresh install resolves freely."""
    runtime, _ = read_lock(RUNTIME_LOCK)
    dev, _ = read_lock(DEV_LOCK)
    needed = closure(PROJECT["dependencies"]) - {SELF}
    assert needed - runtime.keys() == set(), "runtime dependencies missing from requirements.lock"
    assert tools() & needed == set(), "a runtime dependency pulls in a tool"
    everything = closure([f"{PROJECT['name']}[{','.join(PROJECT['optional-dependencies'])}]"])
    missing = everything - {SELF} - runtime.keys() - dev.keys()
    assert missing == set(), "extras' dependencies pinned in neither lock"
    unused = (runtime.keys() | dev.keys()) - everything
    assert unused == set(), "pins nothing in pyproject needs"


def test_license_is_apache_2() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_package_data_globs_match_files() -> None:
    for package, globs in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in globs:
            matches = [p for p in (REPO / package).glob(pattern) if p.is_file()]
            assert matches, f"package-data {package}: {pattern} matches no file"


def test_version_flag_prints_the_package_version() -> None:
    try:
        installed = distribution(PROJECT["name"]).version
    except PackageNotFoundError:
        pytest.skip("the project is not installed here (make installs it with pip -e)")
    assert installed == PROJECT["version"], "installed metadata is stale: pip install -e . again"
    out = subprocess.run(
        [sys.executable, "-m", "osdface", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"osdface {PROJECT['version']}"


def test_wheel_requires_no_tools_and_ships_license_and_data(tmp_path: Path) -> None:
    """Built offline from a copy (the build context the Dockerfile sees, minus ignored files)."""
    setuptools_version = Version(distribution("setuptools").version)
    required = Requirement(next(r for r in PYPROJECT["build-system"]["requires"] if "setup" in r))
    if not required.specifier.contains(setuptools_version):
        pytest.skip(f"setuptools {setuptools_version} here; the build needs {required}")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        for package in REPO.glob(pattern.rstrip("*")):
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(package, src / package.name, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
        (metadata,) = [f for f in files if f.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
    headers = meta.split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers
    assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files)
    unconditional = [
        Requirement(h.split(": ", 1)[1])
        for h in headers
        if h.startswith("Requires-Dist: ") and "extra ==" not in h
    ]
    assert {canonicalize_name(r.name) for r in unconditional} == names(PROJECT["dependencies"])
    assert tools() & {canonicalize_name(r.name) for r in unconditional} == set()
    for needed in ("weights/manifest.json", "service/static/index.html", "osdface/cli.py"):
        assert needed in files, f"{needed} missing from the wheel"
    assert not any(f.startswith("tests/") for f in files), "tests are not shipped"
