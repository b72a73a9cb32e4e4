"""`osdface weights fetch|convert|merge` as processes: a loopback hub, offline, up-to-date skips."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from safetensors.torch import load_file, save_file

from osdface.cli import main
from tests.tiny_weights import write_tiny_weights

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Hub(BaseHTTPRequestHandler):
    """The hub's file-resolve URLs, `/<repo>/resolve/<revision>/<file>`, for a few files."""

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        server: HubServer = self.server  # type: ignore[assignment]
        path = urlparse(self.path).path
        server.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        key = ("/".join(parts[:2]), "/".join(parts[4:])) if parts[2:3] == ["resolve"] else None
        data = server.files.get(key) if key else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class HubServer(ThreadingHTTPServer):
    def __init__(self, files: dict[tuple[str, str], bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Hub)
        self.files = files
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def hub() -> Iterator[HubServer]:
    files = {
        ("tiny/sd", "unet/config.json"): b'{"sample_size": 64}\n',
        ("tiny/sd", "unet/diffusion_pytorch_model.safetensors"): os.urandom(300_000),
        ("tiny/osd", "pytorch_lora_weights.safetensors"): os.urandom(5_000),
    }
    server = HubServer(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _fetch(tmp_path: Path, *argv: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),  # nothing from the user's cache
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "osdface", "weights", "fetch", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_fetch_goes_through_the_hub_client_to_hf_endpoint(tmp_path: Path, hub: HubServer) -> None:
    entries = [
        {"path": "sd21-base/unet/config.json", "hf_repo": "tiny/sd", "hf_file": "unet/config.json"},
        {
            "path": "sd21-base/unet/diffusion_pytorch_model.safetensors",
            "hf_repo": "tiny/sd",
            "hf_file": "unet/diffusion_pytorch_model.safetensors",
        },
        {  # a different name on disk than in the repo
            "path": "osdface/lora-renamed.safetensors",
            "hf_repo": "tiny/osd",
            "hf_file": "pytorch_lora_weights.safetensors",
        },
    ]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"files": entries}))
    root = tmp_path / "w"
    result = _fetch(tmp_path, "--dir", str(root), "--manifest", str(manifest), endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    for entry in entries:
        got = (root / entry["path"]).read_bytes()
        assert got == hub.files[(entry["hf_repo"], entry["hf_file"])]
    gets = {path for method, path in hub.requests if method == "GET"}
    assert gets == {f"/{e['hf_repo']}/resolve/main/{e['hf_file']}" for e in entries}
    recorded = json.loads((root / "checksums.json").read_text())
    assert set(recorded) == {e["path"] for e in entries}
    # Everything present: a second fetch asks the server nothing.
    before = len(hub.requests)
    result = _fetch(tmp_path, "--dir", str(root), "--manifest", str(manifest), endpoint=hub.url)
    assert result.returncode == 0 and len(hub.requests) == before


def test_fetch_offline_lists_the_files_and_the_next_step(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.perf_counter()
    result = _fetch(tmp_path, "--dir", str(tmp_path / "w"), endpoint=closed)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for name in (
        "sd21-base/unet/diffusion_pytorch_model.safetensors",
        "osdface/associate_2.ckpt",
        "facexlib/detection_Resnet50_Final.pth",
        "make serve",
        f"osdface weights convert --dir {tmp_path / 'w'}",
    ):
        assert name in result.stderr, result.stderr
    assert time.perf_counter() - start < 120
    # The hub client's retry warnings, once each: not also through its own stderr handler.
    retries = [line for line in result.stderr.splitlines() if "Retrying in" in line]
    assert retries, result.stderr
    assert len(retries) == len(set(retries)) and all(" WARNING " in r for r in retries), retries


@pytest.mark.parametrize("command", ["convert", "merge", "verify"])
@pytest.mark.parametrize("folder", ["absent", "empty", "partial"])
def test_missing_inputs_are_named_with_the_fetch_to_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, command: str, folder: str
) -> None:
    root = tmp_path / "w"
    if folder != "absent":
        (root / "osdface").mkdir(parents=True)
    if folder == "partial":  # one released file of two, no UNet, no VAE
        (root / "osdface/associate_2.ckpt").write_bytes(b"x")
    assert main(["weights", command, "--dir", str(root)]) == 2  # usage: nothing was started
    assert f"osdface weights fetch --dir {root}" in caplog.text, caplog.text
    expected = {
        "convert": "osdface/embedding_change_weights.pth",
        "merge": "osdface/pytorch_lora_weights.safetensors",
        "verify": "sd21-base/vae/diffusion_pytorch_model.safetensors",
    }[command]
    assert (expected if folder != "absent" else "does not exist") in caplog.text, caplog.text
    assert not root.exists() or not (root / "checksums.json").exists()  # nothing written


def test_verify_without_the_default_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OSDFACE_WEIGHTS_DIR", raising=False)
    assert main(["weights", "verify"]) == 2
    assert "osdface weights fetch --dir osdface-weights" in caplog.text, caplog.text


def test_fetch_refuses_a_bad_manifest_or_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for manifest, message in ((tmp_path / "none.json", "No such file"), (bad, "not a manifest")):
        argv = ["weights", "fetch", "--dir", str(tmp_path / "w"), "--manifest", str(manifest)]
        assert main(argv) == 2
        assert message in caplog.text, caplog.text
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["weights", "fetch", "--dir", str(blocker / "w")]) == 2
    assert f"cannot create the weights folder {blocker / 'w'}" in caplog.text, caplog.text


def test_convert_and_merge_write_nothing_when_up_to_date(tmp_path: Path) -> None:
    weights = write_tiny_weights(tmp_path / "w", prepare=False)
    vre = weights / "osdface/vre.safetensors"
    merged = weights / "osdface/unet-merged/diffusion_pytorch_model.safetensors"
    assert main(["weights", "convert", "--dir", str(weights)]) == 0
    assert main(["weights", "merge", "--dir", str(weights)]) == 0
    first = {p: p.stat().st_mtime_ns for p in (vre, merged)}
    first_merged = load_file(merged)
    assert main(["weights", "convert", "--dir", str(weights)]) == 0
    assert main(["weights", "merge", "--dir", str(weights)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (vre, merged)} == first  # nothing rewritten
    # A different LoRA: merge sees it and writes a different UNet.
    lora_path = weights / "osdface/pytorch_lora_weights.safetensors"
    lora = load_file(lora_path)
    save_file({k: v * 2 for k, v in lora.items()}, str(lora_path))
    assert main(["weights", "merge", "--dir", str(weights)]) == 0
    assert merged.stat().st_mtime_ns != first[merged]
    changed = load_file(merged)
    assert any(not torch.equal(changed[k], first_merged[k]) for k in changed)
    # An output replaced since (here: its mtime) is not trusted: convert writes it again.
    os.utime(vre, ns=(1, 1))
    assert main(["weights", "convert", "--dir", str(weights)]) == 0
    assert vre.stat().st_mtime_ns != 1
    # Touched but identical inputs: re-hashed once, still up to date.
    os.utime(lora_path)
    stamp = merged.stat().st_mtime_ns
    assert main(["weights", "merge", "--dir", str(weights)]) == 0
    assert merged.stat().st_mtime_ns == stamp
