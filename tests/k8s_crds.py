"""JSON schemas for the custom resources in docker/k8s, written from their published CRDs.

Only the fields our manifests use, with the CRDs' names, types and enums; anything else at these
levels is refused (`additionalProperties: false`), so a misspelt field fails the test instead of
being dropped silently by the API server's pruning. Pod templates inside them are checked
against the Kubernetes schemas separately (tests/test_k8s.py).

- RayJob, ray.io/v1: KubeRay `ray-operator/apis/ray/v1/rayjob_types.go` and
  `raycluster_types.go` (RayJobSpec, RayClusterSpec, AuthOptions, HeadGroupSpec,
  WorkerGroupSpec), as of KubeRay 1.5.1.
- PodMonitor, monitoring.coreos.com/v1: Prometheus Operator `PodMonitorSpec`, `PodMetricsEndpoint`.
"""

from __future__ import annotations

from typing import Any

_DURATION = {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"}  # Prometheus durations
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT = {"type": "object"}  # a pod template: checked against Kubernetes' own schema
_COUNT = {"type": "integer", "minimum": 0}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "additionalProperties": False,
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


HEAD_GROUP = _closed(
    {
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _STRING_MAP,
        "template": _OBJECT,
    },
    required=("template",),
)
WORKER_GROUP = _closed(
    {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": _COUNT,
        "minReplicas": _COUNT,
        "maxReplicas": _COUNT,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": _COUNT,
        "suspend": {"type": "boolean"},
        "rayStartParams": _STRING_MAP,
        "template": _OBJECT,
    },
    required=("groupName", "template"),
)
RAY_CLUSTER_SPEC = _closed(
    {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "authOptions": _closed(
            {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"}}
        ),
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    },
    required=("headGroupSpec",),
)
RAY_JOB = _resource(
    "ray.io/v1",
    "RayJob",
    _closed(
        {
            "entrypoint": {"type": "string", "minLength": 1},
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
            "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
            "backoffLimit": _COUNT,
            "shutdownAfterJobFinishes": {"type": "boolean"},
            "ttlSecondsAfterFinished": _COUNT,
            "runtimeEnvYAML": {"type": "string"},
            "rayClusterSpec": RAY_CLUSTER_SPEC,
        },
        required=("entrypoint", "rayClusterSpec"),
    ),
)

POD_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "PodMonitor",
    _closed(
        {
            "selector": _closed({"matchLabels": _STRING_MAP}, required=("matchLabels",)),
            "namespaceSelector": _closed(
                {"any": {"type": "boolean"}, "matchNames": {"type": "array"}}
            ),
            "podMetricsEndpoints": {
                "type": "array",
                "minItems": 1,
                "items": _closed(
                    {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                    },
                    required=("port",),
                ),
            },
        },
        required=("selector", "podMetricsEndpoints"),
    ),
)

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("ray.io/v1", "RayJob"): RAY_JOB,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
}
