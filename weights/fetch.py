"""`osdface weights fetch`: download what is missing, resumably, and check sha256.

Hugging Face files go through huggingface_hub's own client (`hf_hub_download` into the weights
folder: resumable, honours HF_ENDPOINT mirrors, HTTPS_PROXY and HF_TOKEN); plain URLs through a
small ranged downloader. Whether the network is there is decided by the download's own error;
the message then lists the files still missing, where they come from, and what to run next.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from model.errors import ChecksumMismatchError, WeightsError, WeightsNotFoundError
from weights.layout import sha256_file

logger = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"
URL_TIMEOUT_S = 30.0


class NetworkUnavailableError(WeightsNotFoundError):
    """A download could not reach its server (offline, proxy, firewall, mirror down)."""


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


def load_manifest(path: Path | None = None) -> list[ManifestEntry]:
    """The packaged manifest, or one of your own (same JSON shape: a mirror, an air-gapped site)."""
    if path is None:
        text = resources.files("weights").joinpath("manifest.json").read_text()
    else:
        text = Path(path).read_text()
    return [ManifestEntry(**entry) for entry in json.loads(text)["files"]]


def missing_entries(root: Path, entries: list[ManifestEntry]) -> list[ManifestEntry]:
    return [e for e in entries if not (root / e.path).is_file()]


def offline_message(root: Path, missing: list[ManifestEntry], reason: str) -> str:
    lines = [f"cannot download ({reason}). Place these files under {root}:"]
    lines += [f"  {e.path:55s} <- {e.source}" for e in missing]
    lines.append(
        f"then run `make serve` again, or `osdface weights convert --dir {root}` and "
        f"`osdface weights merge --dir {root}`. A mirror: HF_ENDPOINT=https://..., a proxy: "
        "HTTPS_PROXY=http://host:port."
    )
    return "\n".join(lines)


def fetch(
    root: Path,
    *,
    include_optional: bool = False,
    include_train: bool = False,
    include_background: bool = False,
    include_eval: bool = False,
    sd_repo: str | None = None,
    manifest: Path | None = None,
) -> list[Path]:
    """Download every manifest file missing under `root`; check what is new against its sha256.

    Raises NetworkUnavailableError (listing what is still missing) when a server cannot be
    reached, WeightsError when a server answers but refuses (unknown repo, gated, no such file).
    """
    groups = {"serve"} | ({"train"} if include_train else set())
    groups |= {"background"} if include_background else set()
    groups |= {"eval"} if include_eval else set()
    entries = [
        e
        for e in load_manifest(manifest)
        if (include_optional or not e.optional) and e.group in groups
    ]
    if sd_repo:
        entries = [_with_repo(e, sd_repo) for e in entries]
    missing = missing_entries(root, entries)
    fetched = []
    for k, entry in enumerate(missing):
        try:
            fetched.append(_download(root, entry))
        except NetworkUnavailableError as exc:
            raise NetworkUnavailableError(offline_message(root, missing[k:], str(exc))) from exc
    # What was fetched now, and files never checked before. Files already recorded are not
    # re-hashed on every `make serve` (gigabytes); `osdface weights verify` re-checks them all.
    recorded = _recorded(root)
    verify(root, [e for e in entries if e in missing or e.path not in recorded])
    return fetched


def _recorded(root: Path) -> dict[str, str]:
    path = root / CHECKSUMS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _with_repo(entry: ManifestEntry, sd_repo: str) -> ManifestEntry:
    if entry.hf_repo == "stabilityai/stable-diffusion-2-1-base":
        return ManifestEntry(**{**entry.__dict__, "hf_repo": sd_repo})
    return entry


def _download(root: Path, entry: ManifestEntry) -> Path:
    target = root / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s from %s", entry.path, entry.source)
    if entry.hf_repo and entry.hf_file:
        _download_hf(root, entry, target)
    elif entry.url:
        _download_url(entry.url, target)
    else:
        raise WeightsError(f"manifest entry {entry.path} names no hf_repo/hf_file and no url")
    return target


def _download_hf(root: Path, entry: ManifestEntry, target: Path) -> None:
    """Through the hub client into the weights folder (its `.cache/` holds partial downloads)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    _one_handler("huggingface_hub")
    assert entry.hf_repo is not None and entry.hf_file is not None
    rel = Path(entry.path)
    hf_file = Path(entry.hf_file)
    same_tail = rel.parts[-len(hf_file.parts) :] == hf_file.parts
    local_dir = root.joinpath(*rel.parts[: -len(hf_file.parts)]) if same_tail else None
    try:
        path = hf_hub_download(entry.hf_repo, entry.hf_file, local_dir=local_dir)
    except LocalEntryNotFoundError as exc:
        # The client raises this when the server cannot be reached and nothing is cached.
        cause = exc.__cause__ or exc.__context__ or exc
        raise NetworkUnavailableError(f"{type(cause).__name__}: {cause}".split("\n")[0]) from exc
    except HfHubHTTPError as exc:
        if _is_network(exc):
            raise NetworkUnavailableError(str(exc).split("\n")[0]) from exc
        raise WeightsError(f"{entry.hf_repo}/{entry.hf_file}: {exc}".split("\n")[0]) from exc
    if Path(path).resolve() != target.resolve():
        shutil.copyfile(path, target)


def _one_handler(library: str) -> None:
    """The hub client adds a stderr handler of its own to its logger, which also propagates:
    each retry warning was printed twice, once bare. Where the root logger has a handler (the
    command line's), the library's records go there alone, in the same format."""
    if logging.getLogger().handlers:
        logging.getLogger(library).handlers.clear()


def _is_network(exc: BaseException) -> bool:
    """Proxy, connection and timeout errors of the client's HTTP library, by name."""
    chain: BaseException | None = exc
    while chain is not None:
        if any(n in type(chain).__name__ for n in ("Proxy", "Connect", "Timeout", "Offline")):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def _download_url(url: str, target: Path) -> None:
    """Resume from a `.part` file with an HTTP Range request."""
    part = target.with_suffix(target.suffix + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=URL_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise NetworkUnavailableError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    with response:
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
    recorded = _recorded(root)
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
