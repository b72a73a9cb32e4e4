"""Where the tests' real photos and detector are, and fetching them on a machine without them.

The assets folder is `OSDFACE_TEST_ASSETS` (default `../shared/assets`). Where it is absent,
`python -m tests.assets fetch` (run by `make assets`, which `make test` runs first) downloads the
files in `tests/assets_manifest.json` from their pinned public URLs into a cache folder
(`OSDFACE_TEST_ASSETS_CACHE`, default `~/.cache/osdface-test-assets`) and checks each sha256;
`locate()` then finds that cache. Without network it says so in one line and exits 0, and the
tests that need the assets skip as before. The tests themselves never download.

`OSDFACE_TEST_ASSETS_BASE_URL` (or `--base-url`) replaces the public servers by a mirror laid
out as `<base>/<host>/<path of the public URL>`; the fetch tests serve one on loopback.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from model.atomic import atomic_path
from weights.layout import sha256_file

REPO = Path(__file__).resolve().parents[1]
MANIFEST = Path(__file__).with_name("assets_manifest.json")
ASSETS_ENV = "OSDFACE_TEST_ASSETS"
CACHE_ENV = "OSDFACE_TEST_ASSETS_CACHE"
BASE_URL_ENV = "OSDFACE_TEST_ASSETS_BASE_URL"
TIMEOUT_S = 30.0
CHUNK = 1 << 20


@dataclass(frozen=True)
class Asset:
    path: str  # relative to the assets folder
    url: str
    sha256: str
    size: int


class RefusedError(Exception):
    """A download that is not the pinned file (wrong sha256 or size, or an HTTP error)."""


class UnreachableError(Exception):
    """The server could not be reached at all (offline, DNS, refused connection, timeout)."""


def load_manifest(path: Path = MANIFEST) -> list[Asset]:
    return [Asset(**entry) for entry in json.loads(path.read_text())["files"]]


def configured_dir() -> Path:
    """The assets folder the tests are told about (it may not exist)."""
    return Path(os.environ.get(ASSETS_ENV, REPO.parent / "shared" / "assets"))


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "osdface-test-assets"


def is_complete(folder: Path, assets: list[Asset]) -> bool:
    """Every listed file present with its pinned size and sha256 (about 10 MB to hash)."""
    return all(_is_good(folder / a.path, a) for a in assets)


def locate(manifest: Path = MANIFEST) -> Path:
    """The configured folder if it exists, else a complete cache, else the configured path
    (absent: the `assets` fixture then skips, naming it)."""
    configured = configured_dir()
    if configured.is_dir():
        return configured
    cache = cache_dir()
    if cache.is_dir() and is_complete(cache, load_manifest(manifest)):
        return cache
    return configured


def mirror_url(url: str, base: str | None) -> str:
    """`url` itself, or its place under a mirror: `<base>/<host>/<path>`."""
    if not base:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{base.rstrip('/')}/{parts.netloc}{parts.path}"


def fetch(cache: Path, assets: list[Asset], base: str | None, timeout: float) -> int:
    """Download what is missing or wrong into `cache`; 0 when done or offline, 1 on refusals."""
    configured = configured_dir()
    if configured.is_dir():
        print(f"test assets: {configured} is present; nothing to fetch")
        return 0
    fetched, refused = 0, 0
    for asset in assets:
        target = cache / asset.path
        if _is_good(target, asset):
            continue
        url = mirror_url(asset.url, base)
        try:
            _download(url, target, asset, timeout)
            fetched += 1
        except UnreachableError as exc:
            print(
                f"test assets: cannot reach {urllib.parse.urlsplit(url).netloc} ({exc}); "
                f"the tests that need real photos will skip (set {ASSETS_ENV}, or rerun "
                "`make assets` online)",
                file=sys.stderr,
            )
            return 0
        except RefusedError as exc:
            target.unlink(missing_ok=True)  # a stale wrong copy must not look usable either
            print(f"test assets: refused {asset.path}: {exc}; removed", file=sys.stderr)
            refused += 1
    if refused:
        print(f"test assets: {refused} of {len(assets)} files refused; cache {cache}")
        return 1
    if fetched:
        print(f"test assets: fetched {fetched} files into {cache}, sha256 checked")
    return 0


def _is_good(path: Path, asset: Asset) -> bool:
    return (
        path.is_file() and path.stat().st_size == asset.size and sha256_file(path) == asset.sha256
    )


def _download(url: str, target: Path, asset: Asset, timeout: float) -> None:
    """Stream `url` to a temporary name beside `target`, check it, then rename.

    The temporary name is fixed (`model.atomic.partial_name`), so a killed earlier download is
    started over, never appended to; on refusal the temporary file is removed.
    """
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise RefusedError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise UnreachableError(str(getattr(exc, "reason", exc))) from exc
    digest, size = hashlib.sha256(), 0
    with response, atomic_path(target, fsync=False) as temp, temp.open("wb") as out:
        # At most one byte past the pinned size is read: an oversized body is refused without
        # filling the disk.
        while size <= asset.size and (block := _read(response, url, asset.size + 1 - size)):
            out.write(block)
            digest.update(block)
            size += len(block)
        _check(url, asset, size, digest.hexdigest())


def _read(response: http.client.HTTPResponse, url: str, limit: int) -> bytes:
    try:
        return response.read(min(CHUNK, limit))
    except (OSError, http.client.HTTPException) as exc:  # dropped mid-body: offline for us
        raise UnreachableError(f"{url}: {exc!r}") from exc


def _check(url: str, asset: Asset, size: int, sha256: str) -> None:
    if size != asset.size:
        raise RefusedError(f"{url} sent {size} bytes, expected {asset.size}")
    if sha256 != asset.sha256:
        raise RefusedError(f"{url} has sha256 {sha256}, expected {asset.sha256}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("fetch", help="download the test assets into the cache if needed")
    cmd.add_argument("--dir", type=Path, help=f"cache folder (default: ${CACHE_ENV} or ~/.cache)")
    cmd.add_argument("--base-url", help=f"mirror base (default: ${BASE_URL_ENV}, else upstream)")
    cmd.add_argument("--manifest", type=Path, default=MANIFEST, help="default: %(default)s")
    cmd.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per request")
    args = parser.parse_args(argv)
    base = args.base_url or os.environ.get(BASE_URL_ENV)
    return fetch(args.dir or cache_dir(), load_manifest(args.manifest), base, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
