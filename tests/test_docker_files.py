"""Static checks of the deployment files (no Docker engine or cluster on the test machines).

Parses docker/Dockerfile, docker/compose.yaml (+ the multi-GPU override), docker/prometheus.yml,
the Grafana provisioning and docker/k8s/*.yaml, and checks them against each other and against
the code: settings names and values against `service.settings.Settings`, pins against
pyproject/requirements.lock, dashboard metrics against `service.metrics.Metrics`.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError

from service.settings import Settings
from tests.service_helpers import EXPORTED_METRICS

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"

# Variables our containers may set that are not app settings: the Hugging Face Hub client's
# (offline at serve time, cache and token for the weights job), HOME (read-only root in k8s) and
# the interpreter's own.
THIRD_PARTY_ENV = {"HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "HOME"}
THIRD_PARTY_ENV |= {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
# OpenTelemetry's own variables, read by its SDK (service/tracing.py).
THIRD_PARTY_ENV |= {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}


# --- parsing helpers ------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and stages; continuation lines joined, comment lines dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        logical.append(current + line)
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = args.partition("=")
                global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], value)


def env_pairs(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` (key=value form only, as the Dockerfile uses)."""
    pairs = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"ENV without '=' is ambiguous, use key=value: {args}"
        pairs[key] = value
    return pairs


def duration_s(value: str | int | float) -> float:
    """Compose durations: `30s`, `1m30s`, `5m`, `1h`, `250ms`."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(DOCKER / "compose.yaml")


def merged_compose() -> dict[str, Any]:
    """compose.yaml with compose.multi-gpu.yaml layered on top (service keys merged shallowly)."""
    base, override = compose(), load_yaml(DOCKER / "compose.multi-gpu.yaml")
    services = {name: dict(svc) for name, svc in base["services"].items()}
    for name, svc in override["services"].items():
        services.setdefault(name, {}).update(svc)
    return {**base, "services": services}


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objects


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in k8s_objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment; a value from a Secret of docker/k8s is that Secret's."""
    secrets = {
        o["metadata"]["name"]: o.get("stringData", {})
        for o in k8s_objects()
        if o["kind"] == "Secret"
    }
    env = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        value = secrets.get(ref["name"], {}).get(ref["key"], "") if ref else item.get("value", "")
        env[item["name"]] = str(value)
    return env


def settings_problems(env: dict[str, str], where: str) -> list[str]:
    """Names that are not settings, and values the settings refuse; empty when all is well."""
    problems = []
    settings_env = {}
    for name, value in env.items():
        if name.startswith("OSDFACE_"):
            field_name = name.removeprefix("OSDFACE_").lower()
            if field_name not in Settings.model_fields:
                problems.append(f"{where}: {name} is not a setting of service.settings.Settings")
            else:
                settings_env[field_name] = value
        elif name not in THIRD_PARTY_ENV:
            problems.append(f"{where}: {name} is neither an OSDFACE_ setting nor a known variable")
    if not problems:
        try:
            # Through the env source, exactly as the container will: strings parsed by pydantic.
            Settings.model_validate(settings_env)
        except ValidationError as e:
            problems.append(f"{where}: values refused by Settings: {e}")
    return problems


def ours(image: str | None) -> bool:
    return bool(image) and image.split(":")[0].rsplit("/", 1)[-1] == "osdface"


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((DOCKER / "Dockerfile").read_text())


def stage(stages: list[Stage], name: str) -> Stage:
    (found,) = [s for s in stages if s.name == name]
    return found


def runtime_env() -> dict[str, str]:
    _, stages = dockerfile()
    env: dict[str, str] = {}
    for args in stages[-1].all("ENV"):
        env.update(env_pairs(args))
    return env


def pins(text: str) -> dict[str, str]:
    return {
        m.group(1).lower(): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", text, re.MULTILINE)
    }


# --- the checker itself can fail ------------------------------------------------------------


def test_settings_check_flags_typos_and_bad_values() -> None:
    assert settings_problems({"OSDFACE_DEVICE": "cuda", "HF_HUB_OFFLINE": "1"}, "ok") == []
    assert settings_problems({"OSDFACE_DEVCE": "cuda"}, "typo")
    assert settings_problems({"OSDFACE_DEVICE": "tpu"}, "value")
    assert settings_problems({"OSDFACE_MAX_QUEUE_FACES": "2", "OSDFACE_MAX_BATCH_FACES": "8"}, "v")
    assert settings_problems({"OSDFAC_DEVICE": "cuda"}, "prefix typo")


def test_dockerfile_parser_and_durations() -> None:
    args, stages = parse_dockerfile(
        "ARG X=1\n# c\nFROM a:${X} AS one\nRUN echo \\\n  two\nFROM one\nUSER 10\n"
    )
    assert args == {"X": "1"}
    assert [(s.base, s.name) for s in stages] == [("a:${X}", "one"), ("one", None)]
    assert stages[0].all("RUN") == ["echo two"]
    assert duration_s("1m30s") == 90.0 and duration_s("300s") == 300.0
    with pytest.raises(AssertionError):
        duration_s("30 seconds")


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_stages_resolve_for_both_variants() -> None:
    global_args, stages = dockerfile()
    names = {s.name for s in stages}
    assert global_args["VARIANT"] == "gpu", "the default image is the GPU one"
    for variant in ("gpu", "cpu"):
        variables = {**global_args, "VARIANT": variant}
        for s in stages:
            base = expand(s.base, variables)
            assert "$" not in base
            if "{" in s.base and "VARIANT" in s.base:
                assert base in names, f"FROM {s.base} -> {base}: no such stage"
    assert stages[-1].name == "runtime", "the last stage is the default build target"


def test_dockerfile_cuda_and_python_match_the_pins() -> None:
    global_args, stages = dockerfile()
    lock = pins((REPO / "requirements.lock").read_text())
    cuda_image = global_args["CUDA_IMAGE"]
    m = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu", cuda_image)
    assert m, f"not an NVIDIA CUDA runtime base: {cuda_image}"
    cuda = f"{m.group(1)}.{m.group(2)}"
    runtime_pin = lock["nvidia-cuda-runtime"]
    assert runtime_pin.startswith(cuda + "."), f"torch's CUDA is {runtime_pin}, base is {cuda}"
    assert "python3.11" in " ".join(stage(stages, "gpu-base").all("RUN"))
    assert re.match(r"python:3\.11[-.]", global_args["PYTHON_IMAGE"])
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.11" in requires


@pytest.mark.parametrize("builder", ["gpu-builder", "cpu-builder"])
def test_dockerfile_installs_pinned_torch_then_lock_then_project(builder: str) -> None:
    _, stages = dockerfile()
    runs = stage(stages, builder).all("RUN")
    lock = pins((REPO / "requirements.lock").read_text())
    text = "\n".join(runs)
    torch_at = text.index(f"torch=={lock['torch']}")
    assert f"torchvision=={lock['torchvision']}" in text
    lock_at = text.index("-r /")
    project_at = text.index("pip install --no-deps /src")
    assert torch_at < lock_at < project_at, "torch first, then the lock, then the project"
    project_pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={lock['torch']}" in project_pins
    # The serving image carries no test, lint or training tools: the runtime lock only, and the
    # project without extras.
    assert "requirements-dev.lock" not in text and "[" not in text.split("--no-deps /src")[-1]
    assert "requirements-dev.lock" not in " ".join(stage(stages, builder).all("COPY"))


def test_dockerfile_runtime_is_non_root_with_weights_volume_and_readyz_healthcheck() -> None:
    _, stages = dockerfile()
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users, "the runtime stage must switch user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", " ".join(runtime.all("RUN")))
    env = runtime_env()
    assert env["OSDFACE_WEIGHTS_DIR"] == "/weights"
    assert '"/weights"' in " ".join(runtime.all("VOLUME"))
    copies = " ".join(runtime.all("COPY"))
    assert "weights" not in copies.replace("/weights", ""), "weights are a volume, not baked in"
    (health,) = runtime.all("HEALTHCHECK")
    assert "/readyz" in health and "--start-period=" in health
    assert settings_problems(env, "Dockerfile ENV") == []


def test_dockerfile_serves_one_process_on_all_interfaces() -> None:
    _, stages = dockerfile()
    runtime = stages[-1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    # Exec form (JSON), so osdface is PID 1 and receives SIGTERM itself.
    argv = json.loads(entrypoint) + json.loads(cmd)
    assert argv[:2] == ["osdface", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert "--workers" not in argv
    assert "8000" in " ".join(runtime.all("EXPOSE"))
    assert runtime_env()["OSDFACE_PORT"] == "8000"


def test_dockerignore_keeps_sources_and_drops_weights_and_envs() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(
            fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, f"{p}/*") or path.startswith(p + "/")
            for p in patterns
        )

    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in includes["packages"]["find"]["include"]]
    needed = ["pyproject.toml", "requirements.lock", "README.md", "LICENSE", *packages]
    for path in needed:
        assert not ignored(path), f"{path} is needed by the build but .dockerignore drops it"
        # pyproject's `readme` and `license-files` and the lock are read by `pip install /src`:
        # missing, it fails.
        assert (REPO / path).exists() or path in packages, f"{path} missing: the build needs it"
    for path in [".venv", ".git", "osdface-weights", "artifacts", "model/x.safetensors"]:
        assert ignored(path), f"{path} must stay out of the build context"
    assert ignored("service/__pycache__/x.pyc") or ignored("service/x.pyc")


# --- compose --------------------------------------------------------------------------------


def weights_mount(service: dict[str, Any]) -> tuple[str, str, bool]:
    """(volume, target, read_only) of the service's named-volume mount of the weights."""
    for spec in service["volumes"]:
        source, target, *mode = spec.split(":")
        if target == "/weights":
            return source, target, mode == ["ro"]
    raise AssertionError("no /weights mount")


def test_compose_gpu_service_reserves_a_gpu() -> None:
    svc = compose()["services"]["osdface"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert compose_env(svc)["OSDFACE_DEVICE"] == "cuda"


@pytest.mark.parametrize(
    ("server", "weights"), [("osdface", "weights"), ("osdface-cpu", "weights-cpu")]
)
def test_compose_weights_are_prepared_into_the_shared_volume(server: str, weights: str) -> None:
    spec = compose()
    svc, job = spec["services"][server], spec["services"][weights]
    assert svc["depends_on"][weights]["condition"] == "service_completed_successfully"
    volume, target, read_only = weights_mount(svc)
    job_volume, job_target, job_read_only = weights_mount(job)
    assert volume == job_volume and volume in spec["volumes"], "one named volume for both"
    assert read_only and not job_read_only, "the job writes the volume, the server only reads it"
    assert compose_env(svc)["OSDFACE_WEIGHTS_DIR"] == target
    assert compose_env(job)["OSDFACE_WEIGHTS_DIR"] == job_target
    command = " ".join(job["entrypoint"] + job["command"])
    for step in ("fetch", "convert", "merge"):
        assert f"osdface weights {step} --dir {job_target}" in command
    assert job.get("restart") == "no"
    assert compose_env(job)["HF_HUB_OFFLINE"] == "0", "the image is offline; the job fetches"


@pytest.mark.parametrize("name", ["osdface", "osdface-cpu"])
def test_compose_healthcheck_ports_and_grace(name: str) -> None:
    svc = compose()["services"][name]
    env = compose_env(svc)
    port = env["OSDFACE_PORT"]
    test = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in test
    assert duration_s(svc["healthcheck"]["start_period"]) >= 120, "covers loading and warm-up"
    assert any(p.split(":")[-1] == port for p in svc["ports"])
    grace = float(env["OSDFACE_SHUTDOWN_GRACE_S"])
    stop = duration_s(svc["stop_grace_period"])
    assert stop > grace, f"stop_grace_period {stop}s must exceed the app's grace {grace}s"
    assert stop > float(runtime_env()["OSDFACE_SHUTDOWN_GRACE_S"])


def test_compose_cpu_profile() -> None:
    services = compose()["services"]
    cpu = [n for n, s in services.items() if "cpu" in s.get("profiles", [])]
    assert set(cpu) == {"weights-cpu", "osdface-cpu"}
    server = services["osdface-cpu"]
    assert server["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in server, "no GPU reservation on the CPU variant"
    assert compose_env(server)["OSDFACE_DEVICE"] == "cpu"
    assert "osdface" in server["networks"]["default"]["aliases"], "Prometheus finds it as osdface"
    for name, svc in services.items():
        if "cpu" not in svc.get("profiles", []) and ours(svc.get("image")):
            assert svc["build"]["args"]["VARIANT"] == "gpu", name


def test_compose_builds_use_this_dockerfile() -> None:
    for name, svc in merged_compose()["services"].items():
        if ours(svc.get("image")):
            assert "build" in svc, (
                f"{name}: without a build section compose would pull {svc['image']}"
            )
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == REPO, name
            assert (context / svc["build"]["dockerfile"]).is_file(), name
            assert ours(svc["image"]), name


def test_every_env_var_set_for_our_containers_is_a_setting() -> None:
    problems = settings_problems(runtime_env(), "Dockerfile")
    for name, svc in merged_compose()["services"].items():
        if ours(svc.get("image")):
            problems += settings_problems(compose_env(svc), f"compose service {name}")
    for obj in k8s_objects():
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            if ours(container["image"]):
                where = f"k8s {obj['kind']}/{obj['metadata']['name']}"
                problems += settings_problems(k8s_env(container), where)
    assert problems == []


def test_multi_gpu_override_gives_each_replica_its_own_gpu() -> None:
    services = merged_compose()["services"]
    assert "single-gpu" in services["osdface"]["profiles"], "the single service steps aside"
    replicas = {n: s for n, s in services.items() if n.startswith("osdface-gpu")}
    assert len(replicas) >= 2
    ids = []
    for name, svc in replicas.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        ids += device["device_ids"]
        assert "osdface" in svc["networks"]["default"]["aliases"], name
        assert weights_mount(svc)[2], f"{name} mounts the weights read-only"
        assert duration_s(svc["stop_grace_period"]) > float(
            compose_env(svc)["OSDFACE_SHUTDOWN_GRACE_S"]
        )
    assert len(ids) == len(set(ids)) == len(replicas), "one distinct GPU per replica"
    nginx = (DOCKER / "nginx.conf").read_text()
    upstream = set(re.findall(r"server\s+([\w-]+):8000", nginx))
    assert upstream == set(replicas), "the load balancer sends to every replica"


def named_mount(service: dict[str, Any], target: str) -> tuple[str, bool]:
    """(volume, read_only) of the service's mount at `target`."""
    for spec in service["volumes"]:
        source, mounted, *mode = spec.split(":")
        if mounted == target:
            return source, mode == ["ro"]
    raise AssertionError(f"no mount at {target}")


def test_multi_gpu_replicas_share_one_job_store_and_one_jobs_volume() -> None:
    override = load_yaml(DOCKER / "compose.multi-gpu.yaml")
    services = merged_compose()["services"]
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--port" not in command
    store, _ = named_mount(redis, "/data")
    assert store in override["volumes"], "the append-only file outlives the container"
    assert "PONG" in " ".join(redis["healthcheck"]["test"])
    assert "ports" not in redis, "the store is reached on the compose network only"
    replicas = {n: s for n, s in services.items() if n.startswith("osdface-gpu")}
    volumes = set()
    for name, svc in replicas.items():
        env = compose_env(svc)
        url = Settings.model_validate({"jobs_redis_url": env["OSDFACE_JOBS_REDIS_URL"]})
        assert url.jobs_redis_url is not None, name
        parts = urlsplit(url.jobs_redis_url.get_secret_value())
        assert (parts.hostname, parts.port) == ("redis", 6379), name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        volume, read_only = named_mount(svc, env["OSDFACE_JOBS_DIR"])
        assert not read_only, name
        volumes.add(volume)
    assert len(volumes) == 1 and volumes <= set(override["volumes"]), "one jobs volume for all"
    # A new named volume takes the owner of the image's folder: the server's user must own it.
    _, stages = dockerfile()
    jobs_dir = compose_env(next(iter(replicas.values())))["OSDFACE_JOBS_DIR"]
    assert re.search(rf"chown osdface:osdface\b.*\s{jobs_dir}\b", " ".join(stages[-1].all("RUN")))


# --- Prometheus and Grafana -----------------------------------------------------------------


def test_prometheus_scrapes_the_service_port_and_metrics_path() -> None:
    config = load_yaml(DOCKER / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "osdface"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    services = compose()["services"]
    port = compose_env(services["osdface"])["OSDFACE_PORT"]
    assert str(sd["port"]) == port
    (name,) = sd["names"]
    assert name in services, "the DNS name is the compose service"
    prometheus = services["prometheus"]
    assert any(
        v.startswith("./prometheus.yml:/etc/prometheus/prometheus.yml")
        for v in prometheus["volumes"]
    )
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def grafana_dashboards() -> list[dict[str, Any]]:
    return [
        json.loads(p.read_text()) for p in sorted((DOCKER / "grafana/dashboards").glob("*.json"))
    ]


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_grafana_provisioning_matches_compose_mounts() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./")
    )
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert (DOCKER / "grafana/dashboards").is_dir()
    (ds_file,) = (DOCKER / "grafana/provisioning/datasources").glob("*.yaml")
    (datasource,) = [d for d in load_yaml(ds_file)["datasources"] if d["type"] == "prometheus"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(next((DOCKER / "grafana/provisioning/dashboards").glob("*.yaml")))[
        "providers"
    ]
    assert provider["options"]["path"] == mounts["./grafana/dashboards"]
    for dashboard in grafana_dashboards():
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(osdface_[a-z_]+)", expr))


def family(name: str) -> str:
    return re.sub(r"_(bucket|count|sum|total|created|info)$", "", name)


def exported_families() -> set[str]:
    """Every metric family an app exports: service/metrics.py's and the video jobs' (a fresh
    app, nothing started; its job store in a temporary folder)."""
    from service.app import create_app

    with tempfile.TemporaryDirectory() as jobs:
        app = create_app(Settings(jobs_dir=Path(jobs)))
        return {m.name for m in app.state.metrics.registry.collect()}


# Gauges of the shared job store: every replica exports the same store-wide value.
STORE_WIDE = ("osdface_jobs",)


def test_dashboard_panels_use_the_service_metrics_and_cover_the_issue() -> None:
    families = exported_families()
    exprs = [e for d in grafana_dashboards() for _, e in panel_exprs(d)]
    used = set().union(*(metric_names(e) for e in exprs))
    unknown = {n for n in used if family(n) not in families}
    assert unknown == set(), f"dashboard metrics the service does not export: {unknown}"
    required = {family(n) for n in EXPORTED_METRICS}
    assert required <= {family(n) for n in used}
    latency = [e for e in exprs if "osdface_request_duration_seconds_bucket" in e]
    assert {q for e in latency for q in re.findall(r"histogram_quantile\((0\.\d+)", e)} >= {
        "0.5",
        "0.95",
        "0.99",
    }


def store_wide_problems(expr: str) -> list[str]:
    """Uses of a store-wide gauge not taken as the max over the replicas (a sum multiplies it)."""
    problems = []
    for name in STORE_WIDE:
        for match in re.finditer(rf"\b{name}\b(?!_)", expr):
            before = expr[: match.start()].rstrip()
            if not re.search(r"max without \(instance, pod\) \($", before):
                problems.append(f"{name} without `max without (instance, pod) (...)`: {expr}")
    return problems


def test_store_wide_gauges_are_combined_with_max_over_the_replicas() -> None:
    assert store_wide_problems("max without (instance, pod) (osdface_jobs)") == []
    assert store_wide_problems('max without (instance, pod) (osdface_jobs{state="queued"})') == []
    assert store_wide_problems("sum by (state) (osdface_jobs)")
    assert store_wide_problems("sum(osdface_jobs_finished_total)") == []
    exprs = [e for d in grafana_dashboards() for _, e in panel_exprs(d)]
    rules = load_yaml(DOCKER / "alerts.yml")["groups"]
    exprs += [str(r["expr"]) for g in rules for r in g["rules"]]
    assert [p for e in exprs for p in store_wide_problems(e)] == []
    assert any(re.search(rf"\b{STORE_WIDE[0]}\b(?!_)", e) for e in exprs), "a panel shows the jobs"


# --- Kubernetes -----------------------------------------------------------------------------


def test_k8s_deployment_gpu_probes_and_scrape_annotations() -> None:
    deployment = k8s_one("Deployment", "osdface")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = k8s_env(container)
    port = int(env["OSDFACE_PORT"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    def probe(kind: str) -> tuple[str, int]:
        get = container[kind]["httpGet"]
        return get["path"], named.get(get["port"], get["port"])

    assert probe("readinessProbe") == ("/readyz", port)
    assert probe("livenessProbe") == ("/healthz", port)
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert env["OSDFACE_DEVICE"] == "cuda"
    assert container["args"][:1] == ["serve"] and "0.0.0.0" in container["args"]


def test_k8s_non_root_grace_and_weights_volume() -> None:
    deployment = k8s_one("Deployment", "osdface")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    grace = float(k8s_env(container)["OSDFACE_SHUTDOWN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] > grace + pause
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/weights"]
    assert mount["readOnly"] is True
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    k8s_one("PersistentVolumeClaim", claim)
    assert k8s_env(container)["OSDFACE_WEIGHTS_DIR"] == mount["mountPath"]
    job = k8s_one("Job")["spec"]["template"]["spec"]
    job_claims = {v["persistentVolumeClaim"]["claimName"] for v in job["volumes"]}
    assert claim in job_claims, "the weights Job fills the claim the Deployment reads"
    (job_container,) = job["containers"]
    script = " ".join(job_container["command"] + job_container["args"])
    for step in ("fetch", "convert", "merge"):
        assert f"osdface weights {step} --dir /weights" in script


def test_k8s_service_selects_the_pods_and_kustomization_lists_every_manifest() -> None:
    deployment = k8s_one("Deployment", "osdface")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s_one("Service", "osdface")
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    kustomization = load_yaml(K8S / "kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests
