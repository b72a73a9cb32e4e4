"""The lent GPU machine's image, and the wheels `bench/gpu.sh` carries for what it lacks.

Nothing can be installed on that machine from a registry: a package it lacks travels as a wheel
in the git-ignored `.whl/`, filled here with `python -m bench.gpu_image download` (what
`bash bench/gpu.sh --wheels` runs). Only the packages the CUDA tests and the benchmark import
and the image lacks are carried, at the versions of requirements.lock; the image's own packages
(huggingface_hub, safetensors, peft, torch...) are used as they are there.

`hide_missing()` makes this environment look like the image for imports: no module of a
distribution the image lacks, and `bench/gpu.sh` does not carry, is found.
tests/test_gpu_readiness.py and `gpu.sh --tiny` import and run under it, so a CUDA test or a
benchmark step that needs the service's packages fails here rather than on the GPU.

Standard library only, but for `hide_missing` (packaging): `gpu.sh` runs it on the machine before
anything is installed.

    python -m bench.gpu_image download      # here: the carried wheels into .whl/ (needs PyPI)
    python -m bench.gpu_image wheels        # the carried wheel files in .whl/, one a line
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from importlib.metadata import (
    Distribution,
    PackageNotFoundError,
    distribution,
    packages_distributions,
)
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
LOCK = REPO / "requirements.lock"

# The image: Python 3.12.3 (/opt/torch/.venv/bin/python3), torch 2.11.0+cu130, x86-64; the
# versions of a few of its packages, and the names of all (bench/gpu_image_packages.txt).
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
IMAGE_VERSIONS = {
    "torch": "2.11.0", "huggingface-hub": "1.33.0", "safetensors": "0.8.0", "numpy": "2.5.2",
    "accelerate": "1.15.0", "transformers": "5.17.0",
}  # fmt: skip
IMAGE_PACKAGES = frozenset(
    line.strip()
    for line in (REPO / "bench/gpu_image_packages.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)
# Seen missing there: never taken as brought by an image package that requires it here.
ABSENT = frozenset(
    ("diffusers", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "uvicorn",
     "fastapi", "starlette")
)  # fmt: skip
# What gpu.sh carries, at the locked versions. diffusers declares importlib_metadata too, but
# imports it only on Python < 3.8 (the import check runs without it).
CARRIED = ("diffusers",)
# The repository's own top-level folders: on the machine they come from the working tree.
OWN = frozenset({"bench", "model", "osdface", "service", "tests", "train", "weights"})


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_version(name: str, lock: Path = LOCK) -> str:
    """`name`'s pinned version in requirements.lock."""
    for line in lock.read_text().splitlines():
        found = re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s;\\]+)", line)
        if found and normalize(found[1]) == normalize(name):
            return found[2]
    raise LookupError(f"{name} is not pinned in {lock}")


def carried_requirements() -> list[str]:
    """`name==version` of each carried package."""
    return [f"{name}=={locked_version(name)}" for name in CARRIED]


def carried_wheels(folder: Path = WHEELS) -> list[Path]:
    """The carried packages' wheel files in `folder`, one each; LookupError names what is
    missing and how to fetch it."""
    found, missing = [], []
    for requirement in carried_requirements():
        name, version = requirement.split("==")
        wheels = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if wheels:
            found.append(wheels[-1])
        else:
            missing.append(requirement)
    if missing:
        raise LookupError(
            f"{', '.join(missing)} not in {folder}: run `bash bench/gpu.sh --wheels` here first"
        )
    return found


def download_command(folder: Path = WHEELS) -> list[str]:
    """pip's command for the carried wheels, for the image's Python and platform."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms,
        "--dest", str(folder), *carried_requirements(),
    ]  # fmt: skip


def _brought_by_image() -> set[str]:
    """Distributions installed here that the image has, or that one of those requires here.

    The image's packages bring their own dependencies, at the image's versions (its
    huggingface_hub is older than ours and needs other ones); only what this project and the
    carried wheels need beyond them is checked.
    """
    from packaging.requirements import Requirement

    seen, todo = set(), [n for n in IMAGE_PACKAGES if n not in {normalize(c) for c in CARRIED}]
    while todo:
        name = todo.pop()
        if name in seen or name in ABSENT:
            continue
        seen.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return seen


def _missing() -> tuple[frozenset[str], frozenset[str]]:
    """(top-level modules, distribution names) installed here that the image lacks and gpu.sh
    does not carry; the repository's own folders are never among them."""
    present = _brought_by_image() | {normalize(n) for n in CARRIED}
    modules, dists = set(), set()
    for module, names in packages_distributions().items():
        ours = not module.isidentifier() or module in OWN
        if not ours and not any(normalize(d) in present for d in names):
            modules.add(module)
            dists.update(normalize(d) for d in names)
    return frozenset(modules), frozenset(dists)


def missing_modules() -> frozenset[str]:
    """Top-level modules installed here that the image lacks and gpu.sh does not carry."""
    return _missing()[0]


class _Without(importlib.abc.MetaPathFinder):
    """One of sys.meta_path's finders, blind to the hidden modules and their distributions.

    Wrapping the finders, rather than adding one that raises, keeps `importlib.util.find_spec`
    answering None for a hidden module, as on the image: peft and diffusers probe optional
    packages (bitsandbytes...) that way, and an import of one fails with the usual
    ModuleNotFoundError. importlib.metadata asks the same finders for distributions.
    """

    def __init__(self, finder: object, modules: frozenset[str], dists: frozenset[str]) -> None:
        self.finder, self.modules, self.dists = finder, modules, dists

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        find = getattr(self.finder, "find_spec", None)
        if fullname.partition(".")[0] in self.modules or find is None:
            return None
        return find(fullname, path, target)

    def find_distributions(self, *args: object, **kwargs: object) -> Iterator[Distribution]:
        find = getattr(self.finder, "find_distributions", None)
        for dist in find(*args, **kwargs) if find is not None else ():
            if normalize(dist.metadata["Name"] or "") not in self.dists:
                yield dist

    def invalidate_caches(self) -> None:
        invalidate = getattr(self.finder, "invalidate_caches", None)
        if invalidate is not None:
            invalidate()


def hide_missing() -> frozenset[str]:
    """Make sys.meta_path's finders blind to what the image lacks; returns the hidden modules.
    Refuses to start if one of them is already imported (it would stay usable)."""
    modules, dists = _missing()
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in modules)
    if loaded:
        raise RuntimeError(f"already imported, cannot be hidden: {loaded}")
    sys.meta_path[:] = [_Without(finder, modules, dists) for finder in sys.meta_path]
    return modules


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("download", "wheels", "hidden"))
    p.add_argument("--dir", type=Path, default=WHEELS)
    args = p.parse_args(argv)
    if args.action == "download":
        args.dir.mkdir(parents=True, exist_ok=True)
        return subprocess.run(download_command(args.dir), check=False).returncode
    if args.action == "hidden":
        print("\n".join(sorted(missing_modules())))
        return 0
    try:
        print("\n".join(map(str, carried_wheels(args.dir))))
    except LookupError as e:
        print(f"gpu_image: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
