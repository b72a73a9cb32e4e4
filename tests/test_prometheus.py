"""A real Prometheus scrapes a real `osdface serve`; then every Grafana panel query runs on it.

Prometheus (Debian's `prometheus` package, installed by .ci/run) is started on loopback with the
`osdface` job of docker/prometheus.yml, its target rewritten to the test server. After a few
restores, Prometheus' HTTP API must hold the request and stage histograms with the counts the
test itself knows (requests sent, faces returned). Then each query of each dashboard in
docker/grafana/dashboards runs against it: a panel over a metric that the service does not
export fails, and so does one that returns nothing after traffic.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.live_server import REPO, e2e_server, free_port, http_status, skip, stop, wait_until

PHOTO = Path("images/gfpgan/whole_imgs/Blake_Lively.jpg")
RESTORES = 3
SCRAPE_INTERVAL = "1s"
# Grafana's built-in interval variables, as Grafana would expand them for a short range.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
# Counters whose series only appear once the event happened: their panels may be empty, but
# their metric must still be known to Prometheus. Only the finished video jobs by final state:
# no job ends in this test (osdface_rejected_total has its series at 0 from start).
MAY_BE_EMPTY: set[str] = {"osdface_jobs_finished_total"}


def scrape_config(target: str) -> dict[str, Any]:
    """docker/prometheus.yml's `osdface` job (path, scheme, name kept), scraping `target`."""
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "osdface"]
    job = {k: v for k, v in job.items() if not k.endswith("_sd_configs")}
    job.pop("static_configs", None)
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = SCRAPE_INTERVAL
    job["scrape_timeout"] = SCRAPE_INTERVAL
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(REPO / "docker" / "alerts.yml")],
        "scrape_configs": [job],
    }


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, assets: Path, tmp_path_factory) -> Iterator[str]:
    if shutil.which("prometheus") is None:
        skip("prometheus not installed (apt-get install prometheus)")
    with e2e_server(tiny_weights_dir, tmp_path_factory, "prometheus-server") as base:
        yield base


@contextmanager
def running_prometheus(server: str, root: Path, *flags: str) -> Iterator[str]:
    """A real Prometheus on loopback scraping `server` (http://host:port) with the osdface job
    of docker/prometheus.yml, its data and log under `root`, extra command-line `flags`; its
    URL once ready. Skips the test where Prometheus is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        skip("prometheus not installed (apt-get install prometheus)")
    config_path = root / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(scrape_config(server.removeprefix("http://"))))
    port = free_port()
    with (root / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
                *flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(f"{base}/-/ready") == 200, 60, "Prometheus ready")
        yield base
    finally:
        stop(process, timeout=20)


@pytest.fixture(scope="module")
def prometheus(server: str, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("prometheus")
    with running_prometheus(server, root, "--web.enable-lifecycle") as base:
        yield base


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{promql}: {body.get('error')}"
    return body["data"]["result"]


def scalar(prometheus: str, promql: str) -> float | None:
    result = query(prometheus, promql)
    return float(result[0]["value"][1]) if result else None


def value_is(prometheus: str, promql: str, expected: float) -> bool:
    return scalar(prometheus, promql) == expected


@pytest.fixture(scope="module")
def traffic(server: str, prometheus: str, assets: Path) -> dict[str, Any]:
    """Restores sent through the API; returns what the client saw, once Prometheus has it all."""
    wait_until(lambda: value_is(prometheus, 'up{job="osdface"}', 1.0), 60, "the osdface target up")
    photo = (assets / PHOTO).read_bytes()
    faces = []
    for _ in range(RESTORES):
        response = httpx.post(
            f"{server}/restore",
            files={"image": (PHOTO.name, photo, "image/jpeg")},
            headers={"Accept": "application/json"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        faces.append(response.json()["faces_detected"])
    bad = httpx.post(
        f"{server}/restore", files={"image": ("x.jpg", b"not an image", "image/jpeg")}, timeout=60
    )
    assert 400 <= bad.status_code < 500, bad.text
    error_type = bad.json()["error"]["type"]

    # Prometheus has it all once the 4xx (sent last) is in; two more scrapes give every new
    # series the two samples a rate() needs.
    wait_until(
        lambda: value_is(
            prometheus,
            'sum(osdface_request_duration_seconds_count{endpoint="/restore",status_class="4xx"})',
            1.0,
        ),
        60,
        "the 4xx request in Prometheus",
    )
    wait_until(
        lambda: len(query(prometheus, "osdface_errors_total[1m]")[0]["values"]) >= 3,
        60,
        "three scrapes after the traffic",
    )
    return {"faces": faces, "error_type": error_type}


def test_request_and_stage_histograms_have_the_right_counts(
    prometheus: str, traffic: dict[str, Any]
) -> None:
    total_faces = sum(traffic["faces"])
    assert total_faces >= RESTORES, "the real detector finds the faces of the photo"

    def count(promql: str) -> float | None:
        return scalar(prometheus, promql)

    restore = 'osdface_request_duration_seconds_count{job="osdface",endpoint="/restore"'
    assert count(f'sum({restore},status_class="2xx"}})') == RESTORES
    assert count(f'sum({restore},status_class="4xx"}})') == 1
    # Buckets are cumulative: the +Inf bucket holds every observation.
    assert count(f'sum({restore.replace("_count", "_bucket")},le="+Inf"}})') == RESTORES + 1
    for stage in ("decode", "detect", "align", "paste", "encode"):  # once per restored image
        got = count(f'sum(osdface_stage_duration_seconds_count{{stage="{stage}"}})')
        assert got == RESTORES, f"{stage}: {got}"
    batches = count("sum(osdface_batch_size_count)")
    assert batches is not None and 1 <= batches <= total_faces
    assert count("sum(osdface_batch_size_sum)") == total_faces, "every face ran in a batch"
    for stage in ("vre", "vae_encode", "unet", "vae_decode"):  # once per model call
        assert count(f'sum(osdface_stage_duration_seconds_count{{stage="{stage}"}})') == batches
    assert count("sum(osdface_faces_per_image_count)") == RESTORES
    assert count("sum(osdface_faces_per_image_sum)") == total_faces
    assert count(f'sum(osdface_errors_total{{type="{traffic["error_type"]}"}})') == 1
    assert count("sum(osdface_requests_in_flight)") == 0
    assert count("sum(osdface_queue_depth)") == 0


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every provisioned dashboard."""
    found = []
    for path in sorted((REPO / "docker" / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v.get("allValue") or ".*" for v in dashboard["templating"]["list"]}
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = expand_variables(target["expr"], {**GRAFANA_INTERVALS, **variables})
                found.append((path.name, panel["title"], expr))
    return found


def expand_variables(expr: str, variables: dict[str, str]) -> str:
    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"unknown dashboard variable ${name} in {expr}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


def test_every_grafana_panel_query_runs_on_the_scraped_metrics(
    prometheus: str, traffic: dict[str, Any]
) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    metadata = httpx.get(f"{prometheus}/api/v1/metadata", timeout=10).json()["data"]
    failures = []
    for dashboard, title, expr in queries:
        names = set(re.findall(r"\b(osdface_[a-z_]+)", expr))
        # Metadata is keyed by family: `x` for histogram series `x_bucket`/`x_count`/`x_sum`;
        # counters keep `_total` in the classic text format and drop it in OpenMetrics (which
        # /metrics answers Prometheus), as info metrics drop `_info`.
        missing = {
            n
            for n in names
            if n not in metadata
            and re.sub(r"_(bucket|count|sum|total|info)$", "", n) not in metadata
        }
        if missing:
            failures.append(f"{dashboard} / {title}: metrics not exported: {sorted(missing)}")
            continue
        result = query(prometheus, expr)
        if not result and not (names and names <= MAY_BE_EMPTY):
            failures.append(f"{dashboard} / {title}: no data after traffic: {expr}")
    assert failures == []


def test_alert_rules_evaluate_and_stay_quiet(prometheus: str, traffic: dict[str, Any]) -> None:
    """docker/alerts.yml, loaded as docker/prometheus.yml loads it: after normal traffic and one
    client error every rule has evaluated without error, and none is pending or firing."""
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    wait_until(
        lambda: all(
            rule.get("lastEvaluation", "").startswith("20")
            and not rule["lastEvaluation"].startswith("0001")
            for group in httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"][
                "groups"
            ]
            for rule in group["rules"]
        ),
        60,
        "every rule evaluated",
    )
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules} >= {"OSDFaceNotReady", "OSDFaceServerErrors"}
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert rule["state"] == "inactive", (rule["name"], rule["state"])
    assert scalar(prometheus, 'sum(osdface_ready{job="osdface"})') == 1.0
    assert scalar(prometheus, 'count(osdface_build_info{device="cpu",dtype="float32"})') == 1.0
    assert query(prometheus, '{__name__=~"osdface_.*_created"}') == []
