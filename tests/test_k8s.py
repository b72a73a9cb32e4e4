"""The Kubernetes manifests (docker/k8s, docker/k8s/batch) against the schemas and the code.

Built-in kinds are validated offline with `kubernetes-validate` (its schemas ship in the package)
for K8S_VERSION, the version docs/scale-out.md names; custom resources against tests/k8s_crds.py.
Then what no schema knows: settings, routes, metric names and limits as the service defines them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.settings import Settings
from tests.k8s_crds import CRD_SCHEMAS
from tests.test_docker_files import k8s_env, ours, pins, settings_problems

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"
K8S_VERSION = "1.34.0"
SERVER = {"app.kubernetes.io/name": "osdface", "app.kubernetes.io/component": "server"}


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    docs = [
        d for _, d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(docs) == 1, f"expected one {kind} {name or ''}, found {len(docs)}"
    return docs[0]


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every object that makes pods, RayJob groups included."""
    found = []
    for _, doc in manifests():
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if "template" in doc.get("spec", {}):
            found.append((where, doc["spec"]["template"]))
        if doc["kind"] == "RayJob":
            cluster = doc["spec"]["rayClusterSpec"]
            found.append((f"{where} head", cluster["headGroupSpec"]["template"]))
            for group in cluster["workerGroupSpecs"]:
                found.append((f"{where} {group['groupName']}", group["template"]))
    return found


def server_container() -> dict[str, Any]:
    (container,) = one("Deployment", "osdface")["spec"]["template"]["spec"]["containers"]
    return container


def effective_setting(name: str) -> Any:
    """The value the server pod runs with: its env if set, else the Settings default."""
    env = k8s_env(server_container())
    key = f"OSDFACE_{name.upper()}"
    return Settings.model_validate({name: env[key]} if key in env else {}).__getattribute__(name)


def schema_problems(doc: dict[str, Any]) -> str | None:
    """None when `doc` passes its schema, else the validator's message."""
    key = (doc["apiVersion"], doc["kind"])
    try:
        if key in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[key])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
        return str(e).splitlines()[0]
    return None


def nginx_size(value: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    match = re.fullmatch(r"(\d+)([kmg]?)", value.lower())
    assert match, f"not an nginx size: {value!r}"
    return int(match.group(1)) * units[match.group(2)]


def app_routes() -> set[str]:
    from service import routes

    return {route.path for route in routes.router.routes}


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("path_doc", manifests(), ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}")
def test_manifest_passes_its_schema(path_doc: tuple[Path, dict[str, Any]]) -> None:
    _, doc = path_doc
    assert schema_problems(doc) is None


@pytest.mark.parametrize("where_template", pod_templates(), ids=lambda wt: wt[0])
def test_custom_resource_pod_templates_pass_the_pod_schema(where_template) -> None:
    _, template = where_template
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
    kubernetes_validate.validate({**wrapper, "template": template}, K8S_VERSION, strict=True)


def test_the_schema_checks_can_fail() -> None:
    deployment = one("Deployment", "osdface")
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    assert schema_problems(typo) is not None, "unknown field in a Deployment"
    hpa = one("HorizontalPodAutoscaler")
    wrong_type = {**hpa, "spec": {**hpa["spec"], "maxReplicas": "8"}}
    assert schema_problems(wrong_type) is not None, "string where an integer goes"
    job = one("RayJob")
    misspelt = {**job, "spec": {**job["spec"], "shutdownAfterJobFinished": True}}
    assert schema_problems(misspelt) is not None, "misspelt RayJob field"
    monitor = one("PodMonitor")
    endpoints = [{**monitor["spec"]["podMetricsEndpoints"][0], "interval": "15 seconds"}]
    bad = {**monitor, "spec": {**monitor["spec"], "podMetricsEndpoints": endpoints}}
    assert schema_problems(bad) is not None, "not a Prometheus duration"


def test_docs_name_the_validated_kubernetes_version() -> None:
    minor = ".".join(K8S_VERSION.split(".")[:2])
    assert f"Kubernetes {minor}" in (REPO / "docs/scale-out.md").read_text()


def test_each_kustomization_lists_every_manifest_of_its_folder() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        listed = set(yaml.safe_load(kustomization.read_text())["resources"])
        here = {p.name for p in kustomization.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == here, kustomization


# --- the pods ------------------------------------------------------------------------------


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    for where, template in pod_templates():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where


def test_every_osdface_env_of_every_pod_is_a_setting() -> None:
    problems: list[str] = []
    for where, template in pod_templates():
        for container in template["spec"]["containers"]:
            if ours(container["image"]):
                problems += settings_problems(k8s_env(container), where)
    assert problems == []


def test_gpu_pods_require_gpu_nodes() -> None:
    for where, template in pod_templates():
        spec = template["spec"]
        if not any(
            "nvidia.com/gpu" in c["resources"].get("limits", {}) for c in spec["containers"]
        ):
            continue
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        expressions = [e for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]]
        assert {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]} in (
            expressions
        ), where
    spec = one("Deployment", "osdface")["spec"]["template"]["spec"]
    assert "affinity" in spec, "the server asks for a GPU node"


def test_probes_point_at_real_routes_and_startup_waits_for_readiness() -> None:
    container = server_container()
    ports = {p["name"] for p in container["ports"]}
    routes = app_routes()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[kind]["httpGet"]
        assert get["path"] in routes, f"{kind} {get['path']} is not a route of the app"
        assert get["port"] in ports
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "time to load weights"


def test_the_api_key_comes_from_the_secret() -> None:
    (item,) = [e for e in server_container()["env"] if e["name"] == "OSDFACE_API_KEY"]
    ref = item["valueFrom"]["secretKeyRef"]
    secret = one("Secret", ref["name"])
    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})
    assert "api_key" in Settings.model_fields


def test_weights_job_has_a_deadline_and_a_ttl() -> None:
    spec = one("Job", "osdface-weights")["spec"]
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["ttlSecondsAfterFinished"] > 0


# --- traffic: Ingress, autoscaling, disruption ---------------------------------------------


def test_ingress_admits_every_upload_the_service_admits_and_outwaits_its_deadline() -> None:
    ingress = one("Ingress", "osdface")
    notes = ingress["metadata"]["annotations"]
    body = nginx_size(notes["nginx.ingress.kubernetes.io/proxy-body-size"])
    multipart_overhead = 64 * 1024  # boundaries, part headers and the form's other fields
    assert body >= effective_setting("max_upload_bytes") + multipart_overhead
    deadline = effective_setting("request_timeout_s")
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(notes[f"nginx.ingress.kubernetes.io/{name}"]) > deadline, name
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = one("Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_job_uploads_have_an_ingress_of_their_own_above_the_job_limit() -> None:
    ingress = one("Ingress", "osdface-jobs")
    body = nginx_size(
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    )
    assert body >= effective_setting("max_job_bytes") + 64 * 1024
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1/jobs", "Exact")
    from service import job_routes

    assert "/v1/jobs" in {route.path for route in job_routes.router.routes}
    (main,) = one("Ingress", "osdface")["spec"]["rules"]
    assert rule["host"] == main["host"] and path["backend"] == main["http"]["paths"][0]["backend"]


def test_ingress_check_fails_on_the_nginx_default() -> None:
    assert nginx_size("1m") < effective_setting("max_upload_bytes")
    assert nginx_size("24m") == 24 * 1024**2


def test_hpa_scales_the_deployment_on_a_gauge_the_service_exports() -> None:
    from prometheus_client.metrics import Gauge

    from service.metrics import Metrics

    hpa = one("HorizontalPodAutoscaler", "osdface")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "osdface")
    assert "replicas" not in one("Deployment", "osdface")["spec"], "the HPA owns replicas"
    (pods,) = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    name = pods["metric"]["name"]
    metrics = Metrics()
    gauges = {n for n, c in vars(metrics).items() if isinstance(c, Gauge)}
    exported = {getattr(metrics, n)._name for n in gauges}
    assert name in exported, f"{name} is not a gauge of service/metrics.py"
    assert pods["target"]["type"] == "AverageValue"
    per_pod = float(pods["target"]["averageValue"])
    assert 0 < per_pod < effective_setting("max_queue_faces"), "scale before the queue fills"
    (cpu,) = [m["resource"] for m in hpa["metrics"] if m["type"] == "Resource"]
    assert cpu["name"] == "cpu" and cpu["target"]["type"] == "Utilization"
    assert "cpu" in server_container()["resources"]["requests"], "utilisation needs a request"
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def test_adapter_rule_serves_the_hpa_metric_per_pod() -> None:
    (pods,) = [m["pods"] for m in one("HorizontalPodAutoscaler")["spec"]["metrics"] if "pods" in m]
    name = pods["metric"]["name"]
    config = yaml.safe_load(one("ConfigMap", "osdface-prometheus-adapter")["data"]["config.yaml"])
    (rule,) = [r for r in config["rules"] if r["name"]["as"] == name]
    assert re.match(rf"^{name}\{{", rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], name)
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"] == {"resource": "pod"}
    assert overrides["namespace"] == {"resource": "namespace"}
    assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(
        re.findall(r"<<\.\w+>>", rule["metricsQuery"])
    )


def test_podmonitor_scrapes_each_server_pod_at_the_metrics_route() -> None:
    monitor = one("PodMonitor", "osdface")["spec"]
    pod_labels = one("Deployment", "osdface")["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in server_container()["ports"]}
    assert endpoint["path"] in app_routes()


def test_pdb_covers_the_server_pods_and_never_blocks_every_eviction() -> None:
    pdb = one("PodDisruptionBudget", "osdface")["spec"]
    pod_labels = one("Deployment", "osdface")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["selector"]["matchLabels"] == SERVER
    min_replicas = one("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    if "minAvailable" in pdb:
        assert pdb["minAvailable"] < min_replicas, "a drain could never evict a pod"
    else:
        assert pdb["maxUnavailable"] >= 1


# --- video jobs: the shared store and the jobs volume ---------------------------------------

# The slowest restoring rate (frames/s) a server pod is expected to keep on a video: the deployed
# segment must finish within the shutdown grace at this rate, or a stopped pod's segment is lost.
SLOWEST_FRAMES_PER_S = 3.0


def flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def redis_container() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the StatefulSet's pod spec, its one container)."""
    spec = one("StatefulSet", "osdface-redis")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def test_jobs_volume_is_shared_and_mounted_where_the_server_keeps_jobs() -> None:
    spec = one("Deployment", "osdface")["spec"]["template"]["spec"]
    container = server_container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    jobs_dir = str(effective_setting("jobs_dir"))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == jobs_dir]
    assert not mount.get("readOnly"), "the server writes uploads, segments and results"
    claim_name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    claim = one("PersistentVolumeClaim", claim_name)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes share it"


def test_redis_url_comes_from_the_secret_and_names_the_store() -> None:
    (item,) = [e for e in server_container()["env"] if e["name"] == "OSDFACE_JOBS_REDIS_URL"]
    ref = item["valueFrom"]["secretKeyRef"]
    secret = one("Secret", ref["name"])["stringData"]
    url = urlsplit(secret[ref["key"]])
    assert url.scheme == "redis" and url.path == "/0"
    service = one("Service", url.hostname)
    assert service["spec"]["clusterIP"] == "None", "headless, for the StatefulSet"
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    statefulset = one("StatefulSet", "osdface-redis")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert not set(one("Service", "osdface")["spec"]["selector"].items()) <= set(
        pod_labels.items()
    ), "the server Service must not send HTTP to the store"
    _, container = redis_container()
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    # The store requires the password the URL carries: both from the one Secret.
    assert flag_value(container["args"], "--requirepass") == "$(REDIS_PASSWORD)"
    (password,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"]["name"] == ref["name"]
    assert url.password == secret[password["valueFrom"]["secretKeyRef"]["key"]]


def test_redis_keeps_every_acknowledged_write_on_its_volume_and_never_evicts() -> None:
    statefulset = one("StatefulSet", "osdface-redis")["spec"]
    assert statefulset["replicas"] == 1
    _, container = redis_container()
    args = container["args"]
    assert flag_value(args, "--appendonly") == "yes"
    assert flag_value(args, "--appendfsync") == "always"
    assert flag_value(args, "--maxmemory-policy") == "noeviction"
    (template,) = statefulset["volumeClaimTemplates"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == template["metadata"]["name"]]
    assert flag_value(args, "--dir") == mount["mountPath"]
    assert container["readinessProbe"], "ready only once the append-only file is loaded"
    assert container["resources"]["limits"]["memory"]


def test_only_server_pods_reach_the_store() -> None:
    policy = one("NetworkPolicy", "osdface-redis")["spec"]
    redis_labels = one("StatefulSet", "osdface-redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"] == SERVER


def test_termination_grace_covers_the_drain_and_a_whole_segment() -> None:
    spec = one("Deployment", "osdface")["spec"]["template"]["spec"]
    pre_stop = server_container()["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(pre_stop[1])
    grace = effective_setting("shutdown_grace_s")
    assert spec["terminationGracePeriodSeconds"] >= pause + grace + 5, "time to exit after"
    segment = effective_setting("job_segment_frames")
    assert segment / SLOWEST_FRAMES_PER_S <= grace, "a segment is finished before SIGKILL"
    assert effective_setting("job_lease_s") <= 60, "a lost pod's job waits at most a minute"


def test_hpa_scales_on_queued_jobs_taken_as_the_max_over_pods() -> None:
    from tests.test_docker_files import exported_families

    (external,) = [
        m["external"] for m in one("HorizontalPodAutoscaler")["spec"]["metrics"] if "external" in m
    ]
    name = external["metric"]["name"]
    assert external["target"]["type"] == "AverageValue"
    assert float(external["target"]["averageValue"]) >= 1
    config = yaml.safe_load(one("ConfigMap", "osdface-prometheus-adapter")["data"]["config.yaml"])
    (rule,) = [r for r in config["externalRules"] if r["name"]["as"] == name]
    series = re.match(r"^(\w+)\{", rule["seriesQuery"])
    assert series and series.group(1) in exported_families()
    assert re.fullmatch(rule["name"]["matches"], series.group(1))
    assert 'state="queued"' in rule["seriesQuery"]
    query = rule["metricsQuery"]
    # Every pod exports the store-wide count: the max over them, never a sum.
    assert re.match(r"^max\(<<\.Series>>\{<<\.LabelMatchers>>,state=\"queued\"\}\)", query)
    assert "sum" not in query
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}}


# --- the batch job -------------------------------------------------------------------------


def test_rayjob_runs_the_cli_on_the_cluster_it_creates() -> None:
    from osdface.cli import build_parser

    job = one("RayJob", "osdface-restore")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "osdface"
    args = build_parser().parse_args(argv[1:])
    assert args.ray and args.ray_address is None, "RAY_ADDRESS, which `ray job submit` sets"
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for c in head["containers"] for m in c["volumeMounts"]}
    for location in [*args.inputs, args.output, str(args.report)]:
        assert any(location.startswith(m + "/") for m in mounts), f"{location} is on no volume"
    assert (
        job["rayClusterSpec"]["rayVersion"] == pins((REPO / "requirements.lock").read_text())["ray"]
    )
    assert job["shutdownAfterJobFinishes"] and job["ttlSecondsAfterFinished"] >= 0
    assert job["activeDeadlineSeconds"] > 0


def test_rayjob_pods_mount_claims_that_exist_and_gpu_workers_hold_one_gpu() -> None:
    claims = {d["metadata"]["name"] for _, d in manifests() if d["kind"] == "PersistentVolumeClaim"}
    job = one("RayJob", "osdface-restore")["spec"]["rayClusterSpec"]
    for where, template in pod_templates():
        if not where.startswith("RayJob"):
            continue
        spec = template["spec"]
        used = {
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert used <= claims, where
        (container,) = spec["containers"]
        assert {"/weights", "/archive", "/dev/shm"} <= {
            m["mountPath"] for m in container["volumeMounts"]
        }
        assert k8s_env(container)["OSDFACE_WEIGHTS_DIR"] == "/weights"
    (gpu,) = [g for g in job["workerGroupSpecs"] if g["groupName"] == "gpu"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, "one restorer actor per GPU"
    assert job["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no work on the head"
