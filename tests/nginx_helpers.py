"""The real nginx (Debian's package) in front of test upstreams, configured from docker/nginx.conf.

`nginx_config` copies the shipped file verbatim except for what a test has to change: the
upstream servers' addresses (their parameters kept), the listen address, and the pid, log and
temporary-file paths an unprivileged nginx needs in a temporary folder (plus an access-log
format naming the upstream each request went to). So the tests check the config that ships.

`RecordingUpstream` is an HTTP server that records what nginx forwards (method, path, headers,
body) and answers as told: a status, or a closed connection without an answer. It stands where
a replica would, so a test can make "the replica" fail in a chosen way and see what nginx does.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.live_server import REPO, free_port, skip, wait_until

NGINX = Path("/usr/sbin/nginx")
SHIPPED = REPO / "docker" / "nginx.conf"
# host:port of an upstream `server` line (the virtual `server {` block has no address).
UPSTREAM_SERVER = re.compile(r"^(\s*server\s+)([\w.-]+:\d+)(.*;)$", re.MULTILINE)
LISTEN = re.compile(r"^(\s*listen\s+)(\d+)(;)$", re.MULTILINE)
# Each access-log line: the client's request and status, then the upstreams tried, in order.
LOG_FORMAT = '"$request" $status upstreams="$upstream_addr" statuses="$upstream_status"'


def nginx_config(upstream_ports: list[int], port: int, root: Path) -> str:
    """docker/nginx.conf with its upstream servers at 127.0.0.1:`upstream_ports` (in order),
    listening on 127.0.0.1:`port`, and its pid, logs and temporary files under `root`."""
    text = SHIPPED.read_text()
    for directive in ("pid", "error_log", "access_log", "client_body_temp_path"):
        assert not re.search(rf"^\s*{directive}\s", text, re.MULTILINE), (
            f"docker/nginx.conf sets {directive}: the test would set it twice"
        )
    shipped = UPSTREAM_SERVER.findall(text)
    assert len(shipped) == len(upstream_ports), f"the config has {len(shipped)} upstream servers"
    ports = iter(upstream_ports)
    text = UPSTREAM_SERVER.sub(lambda m: f"{m[1]}127.0.0.1:{next(ports)}{m[3]}", text)
    text, listens = LISTEN.subn(lambda m: f"{m[1]}127.0.0.1:{port}{m[3]}", text)
    assert listens == 1, f"expected one `listen PORT;` in docker/nginx.conf, found {listens}"
    main = f"pid {root}/nginx.pid;\nerror_log {root}/error.log warn;\n"
    temp = "".join(
        f"  {kind}_temp_path {root}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    http = (
        f"  log_format upstreams '{LOG_FORMAT}';\n  access_log {root}/access.log upstreams;\n{temp}"
    )
    text, opened = re.subn(r"^http \{\n", lambda m: m[0] + http, text, flags=re.MULTILINE)
    assert opened == 1
    return main + text


def _unprivileged() -> dict[str, object]:
    """Popen arguments that run nginx as `nobody` when the tests run as root (no workers switch
    user, nothing of root's is written)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@dataclass
class Nginx:
    """A running nginx: its URL, its folder (config, logs) and process."""

    base: str
    root: Path
    process: subprocess.Popen

    def access_log(self) -> list[str]:
        path = self.root / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def error_log(self) -> str:
        path = self.root / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def running_nginx(upstream_ports: list[int]) -> Iterator[Nginx]:
    """nginx from docker/nginx.conf in front of 127.0.0.1:`upstream_ports`; stopped after."""
    if not NGINX.exists():
        skip(f"nginx not installed ({NGINX}; apt-get install nginx-light)")
    # Not under pytest's tmp_path: its parents are private to the user, and nginx may run as
    # `nobody`.
    root = Path(tempfile.mkdtemp(prefix="osdface-nginx-"))
    port = free_port()
    (root / "nginx.conf").write_text(nginx_config(upstream_ports, port, root))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    command = [str(NGINX), "-p", str(root), "-c", str(root / "nginx.conf")]
    checked = subprocess.run(
        [*command, "-t", "-q"], capture_output=True, text=True, **_unprivileged()
    )
    assert checked.returncode == 0, f"nginx -t refused the config:\n{checked.stderr}"
    stderr = (root / "stderr.log").open("wb")
    process = subprocess.Popen(
        [*command, "-g", "daemon off;"], stdout=stderr, stderr=subprocess.STDOUT, **_unprivileged()
    )
    nginx = Nginx(f"http://127.0.0.1:{port}", root, process)
    try:

        def listening() -> bool:
            assert process.poll() is None, f"nginx exited:\n{nginx.error_log()}"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 10, "nginx to listen", interval=0.05)
        yield nginx
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
        stderr.close()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Received:
    """One request as an upstream received it."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-case
    body: bytes


@dataclass
class RecordingUpstream:
    """An HTTP/1.1 upstream on 127.0.0.1 that records requests and answers `status` (with a JSON
    body), or closes the connection without answering when `status` is None."""

    status: int | None = 200
    received: list[Received] = field(default_factory=list)
    port: int = 0

    def serve(self) -> ThreadingHTTPServer:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as nginx's upstream keepalive uses it

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                upstream.received.append(Received(self.command, self.path, headers, body))
                if upstream.status is None:
                    self.close_connection = True
                    return
                payload = b'{"upstream": %d}' % upstream.port
                self.send_response(upstream.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self.handle_one()

            def do_POST(self) -> None:
                self.handle_one()

            def do_DELETE(self) -> None:
                self.handle_one()

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@contextmanager
def recording_upstreams(*statuses: int | None) -> Iterator[list[RecordingUpstream]]:
    """One started RecordingUpstream per status; shut down after."""
    upstreams = [RecordingUpstream(status) for status in statuses]
    servers = [u.serve() for u in upstreams]
    try:
        yield upstreams
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
