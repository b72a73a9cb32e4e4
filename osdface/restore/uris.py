"""Files named by local paths or by URIs (`s3://`, `gs://`, `file://`, any fsspec protocol).

Used by `osdface restore --ray`, whose workers may run on other machines: every path travels as
a string and each worker opens its own filesystem from it. pyarrow's filesystems are used where
pyarrow knows the scheme; any other fsspec protocol is wrapped in pyarrow's fsspec handler.
Only pyarrow (and fsspec for other schemes) is imported here, never torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from model.atomic import write_atomic

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(text: str) -> bool:
    return bool(_SCHEME.match(text))


def normalize(location: str) -> str:
    """A URI minus a trailing slash; a local path, or a `file://` URI, as an absolute path."""
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    if is_uri(location):
        return location.rstrip("/")
    return os.path.abspath(os.path.expanduser(location))


def join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def basename(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def inside(child: str, parent: str) -> bool:
    """`child` is `parent` or below it (both normalised)."""
    return child == parent or child.startswith(parent.rstrip("/") + "/")


@lru_cache(maxsize=32)
def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a normalised location (cached per process)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    try:
        return pafs.FileSystem.from_uri(location)
    except (pafs.ArrowInvalid, pafs.ArrowNotImplementedError, ValueError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


@dataclass(frozen=True)
class Entry:
    location: str
    is_dir: bool
    exists: bool


def stat(location: str) -> Entry:
    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    return Entry(location, kind == pafs.FileType.Directory, kind != pafs.FileType.NotFound)


def list_files(folder: str) -> list[str]:
    """The files directly inside `folder` (no recursion), sorted; hidden names left out."""
    fs, path = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return [join(folder, n) for n in names if not n.startswith(".")]


def existing(locations: list[str]) -> set[str]:
    """Which of `locations` exist as files (one listing call per folder, not one per file)."""
    by_folder: dict[str, list[str]] = {}
    for loc in locations:
        by_folder.setdefault(loc.rsplit("/", 1)[0], []).append(loc)
    found: set[str] = set()
    for folder, wanted in by_folder.items():
        fs, path = filesystem(folder)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            continue
        present = set(list_files(folder))
        found.update(loc for loc in wanted if loc in present)
    return found


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(location: str, data: bytes) -> None:
    """Readers (and a re-run after a kill) see no file or the whole file, never half of one.

    On a local (or mounted) filesystem: a hidden temporary name beside the target, then a
    rename. Object stores publish an object only once its upload completes, so there the
    target is written directly.
    """
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if fs.type_name != "local":
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    write_atomic(Path(path), data)
