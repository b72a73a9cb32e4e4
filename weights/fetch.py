"""`osdface weights fetch`: download what is missing, resumably, and check sha256.

Hugging Face files go through huggingface_hub (resumable, progress bars); plain URLs through a
small ranged downloader. Offline, it fails at once and says which file goes where.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from model.errors import ChecksumMismatchError, WeightsNotFoundError
from weights.layout import sha256_file

logger = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    sha256: str | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    url: str | None = None
    optional: bool = False
    group: str = "serve"  # "train": loss networks for `osdface train`; "background": Real-ESRGAN;
    # "eval": metric networks for `osdface eval`
    note: str | None = None

    @property
    def source(self) -> str:
        if self.hf_repo:
            return f"https://huggingface.co/{self.hf_repo}/resolve/main/{self.hf_file}"
        return self.url or "?"


def load_manifest() -> list[ManifestEntry]:
    text = resources.files("weights").joinpath("manifest.json").read_text()
    return [ManifestEntry(**entry) for entry in json.loads(text)["files"]]


def missing_entries(root: Path, entries: list[ManifestEntry]) -> list[ManifestEntry]:
    return [e for e in entries if not (root / e.path).is_file()]


def offline_message(root: Path, missing: list[ManifestEntry]) -> str:
    lines = [f"cannot download: no network. Place these files under {root}:"]
    lines += [f"  {e.path:55s} <- {e.source}" for e in missing]
    return "\n".join(lines)


def _host_reachable(url: str) -> bool:
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def is_offline(entries: list[ManifestEntry]) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return True
    return not all(_host_reachable(e.source) for e in entries[:1])


def fetch(
    root: Path,
    *,
    include_optional: bool = False,
    include_train: bool = False,
    include_background: bool = False,
    include_eval: bool = False,
    sd_repo: str | None = None,
) -> list[Path]:
    """Download every manifest file missing under `root`; verify every checksum known."""
    groups = {"serve"} | ({"train"} if include_train else set())
    groups |= {"background"} if include_background else set()
    groups |= {"eval"} if include_eval else set()
    entries = [
        e for e in load_manifest() if (include_optional or not e.optional) and e.group in groups
    ]
    if sd_repo:
        entries = [_with_repo(e, sd_repo) for e in entries]
    missing = missing_entries(root, entries)
    if missing and is_offline(missing):
        raise WeightsNotFoundError(offline_message(root, missing))
    fetched = [_download(root, e) for e in missing]
    verify(root, entries)
    return fetched


def _with_repo(entry: ManifestEntry, sd_repo: str) -> ManifestEntry:
    if entry.hf_repo == "stabilityai/stable-diffusion-2-1-base":
        return ManifestEntry(**{**entry.__dict__, "hf_repo": sd_repo})
    return entry


def _download(root: Path, entry: ManifestEntry) -> Path:
    target = root / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s", entry.path)
    if entry.hf_repo:
        from huggingface_hub import hf_hub_download

        cached = hf_hub_download(entry.hf_repo, entry.hf_file)
        shutil.copyfile(cached, target)
    else:
        _download_url(entry.url, target)
    return target


def _download_url(url: str, target: Path) -> None:
    """Resume from a `.part` file with an HTTP Range request."""
    part = target.with_suffix(target.suffix + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if done and response.status != 206:
            done = 0  # the server ignored the range: start over
        total = int(response.headers.get("Content-Length", 0)) + done
        with (
            part.open("ab" if done else "wb") as f,
            tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=target.name) as bar,
        ):
            while block := response.read(1 << 20):
                f.write(block)
                bar.update(len(block))
    part.rename(target)


def verify(root: Path, entries: list[ManifestEntry] | None = None) -> dict[str, str]:
    """Check every present file against the manifest or the first-seen checksums.

    Returns the observed {path: sha256}; also written to `<root>/checksums.json`.
    """
    entries = entries if entries is not None else load_manifest()
    recorded_path = root / CHECKSUMS_FILE
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
    observed: dict[str, str] = {}
    for entry in entries:
        path = root / entry.path
        if not path.is_file():
            continue
        digest = sha256_file(path)
        expected = entry.sha256 or recorded.get(entry.path)
        if expected and digest != expected:
            raise ChecksumMismatchError(f"{path}: sha256 {digest}, expected {expected}")
        observed[entry.path] = digest
    recorded_path.write_text(json.dumps({**recorded, **observed}, indent=2) + "\n")
    return observed
