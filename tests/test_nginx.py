"""docker/nginx.conf in a real nginx: which requests it sends on to the other replica.

The shipped config runs with only its addresses and paths changed (tests/nginx_helpers.py) in
front of two recording upstreams that answer as a draining (503) or dying (connection closed
without an answer) replica would. A job POST without an Idempotency-Key must reach one replica
at most once (a retry would make two jobs); with a key it is retried, URI, query and body
unchanged; /restore and job polls are retried.
"""

from __future__ import annotations

import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.live_server import free_port
from tests.nginx_helpers import (
    SHIPPED,
    nginx_config,
    recording_upstreams,
    running_nginx,
)

CLOSE = None  # an upstream that closes the connection without answering
# Above client_body_buffer_size (16k), so nginx buffers it to a file and retries from there.
BODY = random.Random(23).randbytes(200_000)


def blocks(text: str, header: str) -> list[str]:
    """The bodies of the `header { ... }` blocks of an nginx config (nested braces counted)."""
    found = []
    for match in re.finditer(re.escape(header) + r"\s*\{", text):
        depth, at = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[at], 0)
            at += 1
        found.append(text[match.end() : at - 1])
    return found


def directive(block: str, name: str) -> list[list[str]]:
    """Each `name arg ...;` of a block (comments dropped), as its argument lists."""
    code = re.sub(r"#[^\n]*", "", block)
    return [m.split() for m in re.findall(rf"(?:^|[;{{}}\s]){name}\s+([^;]*);", code)]


def location(text: str, match: str) -> str:
    (body,) = blocks(text, f"location {match}")
    return body


# --- the config as written -----------------------------------------------------------------


def test_the_test_config_is_the_shipped_one_with_addresses_and_paths_only() -> None:
    shipped = SHIPPED.read_text().splitlines()
    generated = nginx_config([1111, 2222], 3333, Path("/r")).splitlines()
    added = [line for line in generated if "/r/" in line or line.startswith("  log_format")]
    kept = [line for line in generated if line not in added]
    assert len(kept) == len(shipped)
    changed = [(a, b) for a, b in zip(shipped, kept, strict=True) if a != b]
    assert [b.strip() for _, b in changed] == [
        "server 127.0.0.1:1111 max_fails=3 fail_timeout=10s;",
        "server 127.0.0.1:2222 max_fails=3 fail_timeout=10s;",
        "listen 127.0.0.1:3333;",
    ]


def test_job_posts_are_retried_only_with_an_idempotency_key() -> None:
    text = SHIPPED.read_text()
    keyless = location(text, "= /v1/jobs")
    assert "$http_idempotency_key" in keyless
    (rewrite,) = directive(keyless, "rewrite")
    target = rewrite[1]
    (retry,) = directive(keyless, "proxy_next_upstream")
    assert "non_idempotent" not in retry, "a job POST without a key must not be sent twice"
    keyed = location(text, f"= {target}")
    assert directive(keyed, "internal") or "internal;" in keyed, "not reachable from outside"
    (retry,) = directive(keyed, "proxy_next_upstream")
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry)
    (proxy,) = directive(keyed, "proxy_pass")
    assert proxy[0].endswith("/v1/jobs"), "the replica gets the job route, not the internal one"
    (retry,) = directive(location(text, "/"), "proxy_next_upstream")
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry), "/restore retried"


def test_the_parser_finds_a_non_idempotent_retry() -> None:
    bad = "location = /v1/jobs {\n  proxy_next_upstream error non_idempotent; # x\n}"
    (retry,) = directive(location(bad, "= /v1/jobs"), "proxy_next_upstream")
    assert "non_idempotent" in retry


def test_job_uploads_may_be_larger_than_photos() -> None:
    from service.settings import Settings
    from tests.test_k8s import nginx_size

    text = SHIPPED.read_text()
    for match in ("= /v1/jobs", "= /_jobs_keyed"):
        (size,) = directive(location(text, match), "client_max_body_size")
        assert nginx_size(size[0]) >= Settings().max_job_bytes + 64 * 1024, match


# --- the config at work --------------------------------------------------------------------


def post_job(base: str, key: str | None) -> httpx.Response:
    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    if key:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{base}/v1/jobs?duration=2", content=BODY, headers=headers, timeout=30)


@pytest.mark.parametrize("failure", [503, CLOSE], ids=["draining_503", "connection_closed"])
def test_keyed_job_post_goes_on_to_the_other_replica_unchanged(failure: int | None) -> None:
    with recording_upstreams(failure, failure) as ups, running_nginx([u.port for u in ups]) as lb:
        answer = post_job(lb.base, "key-1")
        assert answer.status_code == (503 if failure else 502)
        for upstream in ups:
            (got,) = upstream.received
            assert (got.method, got.path, got.body) == ("POST", "/v1/jobs?duration=2", BODY)
            assert got.headers["idempotency-key"] == "key-1"


@pytest.mark.parametrize("failure", [503, CLOSE], ids=["draining_503", "connection_closed"])
def test_keyless_job_post_reaches_one_replica_at_most_once(failure: int | None) -> None:
    with recording_upstreams(failure, failure) as ups, running_nginx([u.port for u in ups]) as lb:
        answer = post_job(lb.base, None)
        assert answer.status_code == (503 if failure else 502)
        received = [r for u in ups for r in u.received]
        assert [(r.method, r.path, r.body) for r in received] == [
            ("POST", "/v1/jobs?duration=2", BODY)
        ]
        assert "idempotency-key" not in received[0].headers


def test_keyed_job_post_succeeds_beside_a_draining_replica() -> None:
    with recording_upstreams(503, 202) as ups, running_nginx([u.port for u in ups]) as lb:
        answers = [post_job(lb.base, f"key-{i}").status_code for i in range(4)]
        assert answers == [202] * 4
        assert len(ups[1].received) == 4


def test_keyless_job_post_is_retried_when_no_replica_got_it() -> None:
    with recording_upstreams(202) as (up,), running_nginx([up.port, free_port()]) as lb:
        answers = [post_job(lb.base, None).status_code for _ in range(4)]
    assert answers == [202] * 4, "connection refused: nothing was sent, so nginx retries"
    assert len(up.received) == 4


@pytest.mark.parametrize("failure", [503, CLOSE], ids=["draining_503", "connection_closed"])
def test_restore_goes_on_to_the_other_replica(failure: int | None) -> None:
    with recording_upstreams(failure, 200) as ups, running_nginx([u.port for u in ups]) as lb:
        for _ in range(4):
            answer = httpx.post(f"{lb.base}/restore", content=BODY, timeout=30)
            assert answer.status_code == 200
        restores = [r for r in ups[1].received if r.path == "/restore"]
        assert len(restores) == 4 and all(r.body == BODY for r in restores)
        assert ups[0].received, "the failing replica was tried first at least once"


def test_a_replica_skipped_by_one_worker_is_skipped_by_every_worker() -> None:
    """nginx runs a worker per core; without a shared upstream zone each keeps its own failure
    count, so a replica one worker has taken out (or put back) is still tried (or skipped) by
    the others, which is how a rolling restart ends with no live upstream in one worker."""
    with recording_upstreams(503, 200) as ups, running_nginx([u.port for u in ups]) as lb:
        with httpx.Client() as one_connection:  # one worker: until it counts max_fails (3)
            while len(ups[0].received) < 3:
                answer = one_connection.post(f"{lb.base}/restore", content=b"x", timeout=30)
                assert answer.status_code == 200

        def fresh_connection(_: int) -> int:  # spread over every worker
            with httpx.Client() as client:
                return client.post(f"{lb.base}/restore", content=b"x", timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(fresh_connection, range(32)))
        assert statuses == [200] * 32
        assert len(ups[0].received) == 3, "a worker tried the replica another had taken out"


def test_job_polls_go_on_to_the_other_replica_when_one_cannot_answer() -> None:
    with recording_upstreams(CLOSE, 200) as ups, running_nginx([u.port for u in ups]) as lb:
        for method in ("GET", "GET", "DELETE", "GET"):
            answer = httpx.request(method, f"{lb.base}/v1/jobs/abc/result", timeout=30)
            assert answer.status_code == 200
        assert [r.method for r in ups[1].received] == ["GET", "GET", "DELETE", "GET"]


def test_a_job_store_503_is_answered_and_takes_no_replica_out() -> None:
    """Every replica shares the store: its 503 is the client's answer, and counting it against
    the replicas (max_fails=3) would leave /restore with no replica at all."""
    with recording_upstreams(503, 503) as ups, running_nginx([u.port for u in ups]) as lb:
        polls = [httpx.get(f"{lb.base}/v1/jobs/abc", timeout=30).status_code for _ in range(8)]
        assert polls == [503] * 8
        assert sum(len(u.received) for u in ups) == 8, "each poll reached one replica once"
        for upstream in ups:
            upstream.status = 200
        restores = [httpx.post(f"{lb.base}/restore", content=b"x").status_code for _ in range(4)]
        assert restores == [200] * 4, "both replicas still in the upstream"


def test_the_internal_location_is_not_reachable_from_outside() -> None:
    with recording_upstreams(200, 200) as ups, running_nginx([u.port for u in ups]) as lb:
        assert httpx.post(f"{lb.base}/_jobs_keyed", content=b"x").status_code == 404
        assert [r for u in ups for r in u.received] == []


def test_a_video_upload_above_the_photo_limit_reaches_the_service() -> None:
    big = b"\0" * (33 * 1024 * 1024)
    with recording_upstreams(202, 202) as ups, running_nginx([u.port for u in ups]) as lb:
        assert httpx.post(f"{lb.base}/v1/jobs", content=big, timeout=60).status_code == 202
        keyed = {"Idempotency-Key": "k"}
        answer = httpx.post(f"{lb.base}/v1/jobs", content=big, headers=keyed, timeout=60)
        assert answer.status_code == 202
        assert httpx.post(f"{lb.base}/restore", content=big, timeout=60).status_code == 413
        assert sorted(len(r.body) for u in ups for r in u.received) == [len(big)] * 2
