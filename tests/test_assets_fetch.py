"""`python -m tests.assets fetch` against a loopback HTTP server laid out like the public URLs.

Nothing here reaches the internet: every fetch gets a loopback base URL (a live server in a
thread, or a closed port), and proxies are bypassed so loopback stays loopback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from model.atomic import partial_name
from tests.assets import (
    ASSETS_ENV,
    BASE_URL_ENV,
    CACHE_ENV,
    MANIFEST,
    Asset,
    load_manifest,
    locate,
    main,
    mirror_url,
)

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Upstream-shaped URLs on both hosts the real manifest uses (raw files at a commit, a release).
SYNTHETIC = {
    "images/demo/cropped_faces/a.png": f"https://raw.githubusercontent.com/o/r/{COMMIT}/inputs/a.png",
    "images/demo/whole_imgs/b.jpg": f"https://raw.githubusercontent.com/o/r/{COMMIT}/inputs/b.jpg",
    "detectors/d.pth": "https://github.com/o/d/releases/download/v0.1.0/d.pth",
}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serving(root: Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 from a thread; yields the base URL."""
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def served_path(root: Path, asset: Asset) -> Path:
    """Where a mirror serving the folder `root` keeps `asset` (`<root>/<host>/<url path>`)."""
    return root / mirror_url(asset.url, "x").removeprefix("x/")


def mirror(root: Path, assets: list[Asset], source: Path) -> None:
    """Copy each asset's true bytes (`source/<path>`) to where a mirror at `root` serves it."""
    for asset in assets:
        served = served_path(root, asset)
        served.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / asset.path, served)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[Path]:
    """Temporary (hidden) files anywhere under `folder`."""
    return [p for p in folder.rglob(".*") if p.is_file()]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An absent assets folder, a fresh cache, no proxy; applied here and handed to children."""
    values = {
        ASSETS_ENV: str(tmp_path / "nowhere"),
        CACHE_ENV: str(tmp_path / "cache"),
        "no_proxy": "*",
        "NO_PROXY": "*",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    return values


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, list[Asset], Path]:
    """(manifest, its assets, a folder holding their true bytes): random files, real shape."""
    source = tmp_path / "source"
    rng = random.Random(0)
    entries = []
    for path, url in SYNTHETIC.items():
        data = rng.randbytes(rng.randrange(1000, 300_000))
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        entries.append({"path": path, "url": url, "sha256": digest, "size": len(data)})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"files": entries}))
    return manifest, load_manifest(manifest), source


def fetch(base: str, manifest: Path = MANIFEST) -> int:
    return main(["fetch", "--base-url", base, "--manifest", str(manifest), "--timeout", "10"])


def test_fresh_cache_gets_every_file_and_is_found(
    env: dict[str, str], synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, assets, source = synthetic
    cache = Path(env[CACHE_ENV])
    mirror(tmp_path / "www", assets, source)
    with serving(tmp_path / "www") as base:
        assert fetch(base, manifest) == 0
    out, err = capsys.readouterr()
    assert f"fetched {len(assets)} files into {cache}" in out and not err
    for asset in assets:
        assert sha256(cache / asset.path) == asset.sha256
    assert not leftovers(cache)
    assert locate(manifest) == cache
    # Complete: a second run asks nothing of any server (this base refuses every connection).
    assert fetch(f"http://127.0.0.1:{closed_port()}", manifest) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip", "has sha256"),  # same size, other bytes
        ("append", "bytes, expected"),  # the right bytes and more
        ("truncate", "bytes, expected"),
        ("missing", "HTTP 404"),
    ],
)
def test_a_wrong_file_is_refused_and_removed(
    env: dict[str, str],
    synthetic,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    message: str,
) -> None:
    manifest, assets, source = synthetic
    cache = Path(env[CACHE_ENV])
    www = tmp_path / "www"
    mirror(www, assets, source)
    bad = assets[1]
    served = served_path(www, bad)
    data = served.read_bytes()
    damaged = {
        "flip": data[:100] + bytes([data[100] ^ 1]) + data[101:],
        "append": data + b"\0" * 10,
        "truncate": data[:-1],
    }
    if damage == "missing":
        served.unlink()
    else:
        served.write_bytes(damaged[damage])
    # A stale wrong copy from before must go too, or it would pass for the real file.
    (cache / bad.path).parent.mkdir(parents=True)
    (cache / bad.path).write_bytes(b"stale")
    with serving(www) as base:
        assert fetch(base, manifest) == 1
    out, err = capsys.readouterr()
    assert f"refused {bad.path}: " in err and message in err and "removed" in err, err
    assert f"1 of {len(assets)} files refused" in out
    assert not (cache / bad.path).exists()
    assert not leftovers(cache)
    for good in (assets[0], assets[2]):
        assert sha256(cache / good.path) == good.sha256
    assert locate(manifest) == Path(env[ASSETS_ENV])  # incomplete: not used, tests skip


def test_a_partial_earlier_download_is_redone(
    env: dict[str, str], synthetic, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, assets, source = synthetic
    cache = Path(env[CACHE_ENV])
    mirror(tmp_path / "www", assets, source)
    killed, cut = assets[0], assets[2]
    # A killed run leaves its temporary file; another left the real name cut short.
    part = partial_name(cache / killed.path)
    part.parent.mkdir(parents=True)
    part.write_bytes((source / killed.path).read_bytes()[:500])
    (cache / cut.path).parent.mkdir(parents=True)
    (cache / cut.path).write_bytes((source / cut.path).read_bytes()[:-7])
    with serving(tmp_path / "www") as base:
        assert fetch(base, manifest) == 0
    assert "fetched 3 files" in capsys.readouterr().out
    for asset in assets:
        assert sha256(cache / asset.path) == asset.sha256
    assert not leftovers(cache)


def run_fetch(env: dict[str, str], base: str) -> subprocess.CompletedProcess[str]:
    """`python -m tests.assets fetch` as `make assets` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "tests.assets", "fetch", "--timeout", "10"],
        cwd=REPO,
        env={**os.environ, **env, BASE_URL_ENV: base},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unreachable_server_says_so_once_and_exits_0(env: dict[str, str]) -> None:
    port = closed_port()
    result = run_fetch(env, f"http://127.0.0.1:{port}")
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, lines
    assert len(lines) == 1 and f"cannot reach 127.0.0.1:{port}" in lines[0], lines
    assert not [p for p in Path(env[CACHE_ENV]).rglob("*") if p.is_file()]
    assert locate() == Path(env[ASSETS_ENV])  # the `assets` fixture skips, naming it


def test_a_present_assets_folder_needs_nothing(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    present = tmp_path / "assets"
    present.mkdir()
    monkeypatch.setenv(ASSETS_ENV, str(present))
    result = run_fetch({**env, ASSETS_ENV: str(present)}, f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert result.stdout == f"test assets: {present} is present; nothing to fetch\n"
    assert not Path(env[CACHE_ENV]).exists()
    assert locate() == present


def test_real_manifest_over_loopback_fills_the_cache_the_tests_use(
    env: dict[str, str], assets: Path, tmp_path: Path
) -> None:
    from tests.conftest import assets_dir

    manifest = load_manifest()
    mirror(tmp_path / "www", manifest, assets)
    with serving(tmp_path / "www") as base:
        result = run_fetch(env, base)
    assert result.returncode == 0, result.stderr
    cache = Path(env[CACHE_ENV])
    assert f"fetched {len(manifest)} files into {cache}" in result.stdout
    for asset in manifest:
        assert sha256(cache / asset.path) == asset.sha256, asset.path
    assert assets_dir() == cache  # OSDFACE_TEST_ASSETS points nowhere: the cache is used


def test_manifest_is_pinned() -> None:
    manifest = load_manifest()
    assert len({a.path for a in manifest}) == len(manifest)
    for asset in manifest:
        assert re.fullmatch(r"[0-9a-f]{64}", asset.sha256) and asset.size > 0, asset
        url = urllib.parse.urlsplit(asset.url)
        assert url.scheme == "https", asset.url
        if url.netloc == "raw.githubusercontent.com":
            assert re.fullmatch(r"/TencentARC/(GFPGAN|VQFR)/[0-9a-f]{40}/inputs/.+", url.path)
        else:
            assert asset.url == (
                "https://github.com/xinntao/facexlib/releases/download/v0.1.0/"
                "detection_mobilenet0.25_Final.pth"
            )


def test_manifest_matches_the_assets(assets: Path) -> None:
    """Every photo and the MobileNet detector, with their bytes; URLs at SOURCE.txt's commits."""
    manifest = {a.path: a for a in load_manifest()}
    held = {
        p.relative_to(assets).as_posix()
        for p in [*(assets / "images").rglob("*"), *(assets / "detectors").glob("*.pth")]
        if p.suffix in (".png", ".jpg", ".pth")
    }
    assert held == set(manifest)
    for path, asset in manifest.items():
        assert (assets / path).stat().st_size == asset.size, path
        assert sha256(assets / path) == asset.sha256, path
    sources = sorted((assets / "images").glob("*/SOURCE.txt"))
    if not sources:
        pytest.skip(f"no SOURCE.txt under {assets}/images (a fetched cache holds none)")
    for source in sources:
        repo, commit = source.read_text().split()
        prefix = f"https://raw.githubusercontent.com/{repo.replace('+', '/')}/{commit}/inputs/"
        project = source.parent.name
        for path, asset in manifest.items():
            if path.startswith(f"images/{project}/"):
                assert asset.url == prefix + path.removeprefix(f"images/{project}/")


def test_make_test_fetches_before_pytest() -> None:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    plan = subprocess.run(
        ["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "-m tests.assets fetch" in plan and "-m pytest" in plan, plan
    assert plan.index("-m tests.assets fetch") < plan.index("-m pytest"), plan
