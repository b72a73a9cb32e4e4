"""`osdface restore --url`: the flags of a run whose work a service does, and the checks made
before anything is sent.

The plan, resume, naming, report and exit codes are the local command's (plan.py, ledger.py,
reporting.py, command.py); only the runner differs (osdface/restore/remote_runner.py, through
`osdface.client`). What the service decides (its weights, device, detector, latent, batching,
limits) is read from its `/v1/info`: a flag asking for something else is refused in one line
(exit 2) before the first photo is sent. No torch and no httpx here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.media.codecs.formats import normalize_format
from model.media.video.config import DEFAULT_WINDOW_FRAMES
from osdface.common import SETTING_FLAGS, UsageError, given

if TYPE_CHECKING:  # config.py holds RemoteFlags in the RunConfig
    from osdface.restore.config import RunConfig
    from osdface.restore.plan import Plan

# Settings of the machine that runs the model: with --url the service's own apply.
LOCAL_ONLY_SETTINGS = (
    "weights_dir",
    "device",
    "dtype",
    "max_batch_faces",
    "max_upload_bytes",
    "max_pixels",
    "max_output_pixels",
    "fast_path",
    "compile",
    "torch_threads",
    "seed",
)
# Flags of the local run only: (dest, flag, why).
LOCAL_ONLY_FLAGS = (
    ("ray", "--ray", "the service is the cluster"),
    ("ray_address", "--ray-address", "the service is the cluster"),
    ("ray_cpus", "--ray-cpus", "the service is the cluster"),
    ("no_merge", "--no-merge", "the service loads its weights its own way"),
    ("save_faces", "--save-faces", "the service sends back the photo, not its face crops"),
    ("compare", "--compare", "the service sends back the photo, not its face crops"),
)
# Settings that shape the pixels, decided by the service: asked for by a flag, they must match
# what /v1/info says (the service's value, where in its answer).
SERVICE_SETTINGS: dict[str, tuple[str, str]] = {
    "detector": ("detector", "name"),
    "detect_threshold": ("detector", "threshold"),
    "detect_max_side": ("detector", "max_side"),
    "latent": ("model", "latent"),
}
# The service's values of what a flag may set per request (sent as form fields) and of what
# only the service sets; where in /v1/info.
SERVICE_DEFAULTS: dict[str, tuple[str, str]] = {
    "min_face_size": ("detector", "min_face_size"),
    "max_faces": ("limits", "max_faces"),
    "max_batch_faces": ("batching", "max_batch_faces"),
    "device": ("model", "device"),
    "dtype": ("model", "dtype"),
    "max_upload_bytes": ("limits", "max_upload_bytes"),
}
SENT_SETTINGS = ("min_face_size", "max_faces")  # flags sent as form fields
# Video flags a video job does not take (service/job_routes.py FIELDS).
VIDEO_ONLY_LOCAL = ("--codec", "--no-smoothing", "--window-frames", "--only-center-face")
READY_WAIT_S = 300.0  # a service still loading its weights (503) is waited for this long


@dataclass(frozen=True)
class RemoteFlags:
    """Where the service is and how to talk to it; `asked`: the settings given as flags that
    the service decides or takes per request (detector, threshold, ..., max_faces), whose
    values (in the run's settings) are checked against its /v1/info."""

    url: str
    api_key: str | None = None
    api_key_file: Path | None = None
    ca_bundle: Path | None = None
    concurrency: int | None = None  # None: from the service's batch size
    asked: frozenset[str] = frozenset()


def add_remote_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote (the work done by a running `osdface serve`: docs/cli.md)")
    g.add_argument(
        "--url",
        metavar="URL",
        help="restore through the service at URL (http://gpu-box:8000): same plan, names, "
        "resume and report; the service's weights, device and detector apply",
    )
    g.add_argument(
        "--api-key",
        metavar="KEY",
        help="the service's API key (default: env OSDFACE_API_KEY, else the file "
        "OSDFACE_API_KEY_FILE names); visible to other users in `ps`: prefer the variable",
    )
    g.add_argument("--api-key-file", type=Path, metavar="FILE", help="read the API key from FILE")
    g.add_argument("--ca-bundle", type=Path, metavar="PEM", help="verify TLS against this CA")
    g.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="photos in flight at once (default: the service's batch size plus its CPU "
        "workers, at most its max_inflight_requests)",
    )


def remote_flags(args: argparse.Namespace) -> RemoteFlags | None:
    """The checked remote flags (None without --url); UsageError for a flag of the local run
    only, or a remote flag without --url."""
    url = getattr(args, "url", None)
    extra = [f for f in ("api_key", "api_key_file", "ca_bundle", "concurrency") if _given(args, f)]
    if url is None:
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            raise UsageError(f"{flag} is for a run through a service: add --url URL")
        return None
    if not url.strip().startswith(("http://", "https://")):
        raise UsageError(f"--url must start with http:// or https:// (got {url!r})")
    for dest, flag, why in LOCAL_ONLY_FLAGS:
        if getattr(args, dest, None):
            raise UsageError(f"{flag} is not available with --url: {why}")
    flags = {name: flag for flag, name, _ in SETTING_FLAGS}
    for name in LOCAL_ONLY_SETTINGS:
        if getattr(args, name, None) is not None:
            raise UsageError(
                f"{flags[name]} is a setting of the machine that runs the model: with --url "
                f"the service's own applies (set it where `osdface serve` runs); drop {flags[name]}"
            )
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1 (got {args.concurrency})")
    if args.api_key is not None and args.api_key_file is not None:
        raise UsageError("give --api-key or --api-key-file, not both")
    return RemoteFlags(
        url.strip().rstrip("/"),
        args.api_key,
        args.api_key_file,
        args.ca_bundle,
        args.concurrency,
        frozenset(given(args, [*SERVICE_SETTINGS, *SENT_SETTINGS])),
    )


def _given(args: argparse.Namespace, name: str) -> bool:
    return getattr(args, name, None) is not None


def refuse_video_flags(args: argparse.Namespace) -> None:
    """With --url, the video flags a video job does not take are refused (videos in the plan)."""
    used = {
        "--codec": args.codec is not None,
        "--no-smoothing": bool(args.no_smoothing),
        "--window-frames": args.window_frames != DEFAULT_WINDOW_FRAMES,
        "--only-center-face": bool(getattr(args, "only_center_face", None)),
    }
    for flag in VIDEO_ONLY_LOCAL:
        if used[flag]:
            raise UsageError(
                f"{flag} is not available for videos with --url: the service's video jobs take "
                "--start, --duration, --crf, --strength and --max-faces"
            )


# --- what /v1/info says --------------------------------------------------------------------------


def _at(info: Mapping[str, Any], section: str, key: str) -> Any:
    part = info.get(section)
    return part.get(key) if isinstance(part, Mapping) else None


def service_config(config: RunConfig, plan: Plan, info: Mapping[str, Any]) -> RunConfig:
    """The run's configuration with what the service decides (detection, latent, batch size,
    device, weights) in place of this machine's settings, so that the ledger records what
    made each output; UsageError for an option the service does not support."""
    remote = config.remote
    assert remote is not None
    for name, (section, key) in SERVICE_SETTINGS.items():
        theirs, ours = _at(info, section, key), getattr(config.settings, name)
        if name in remote.asked and theirs is not None and ours != theirs:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} {ours} is not what {remote.url} uses ({theirs}); with "
                f"--url the service's own applies: drop {flag}, or restore locally"
            )
    _check_options(config, plan, info)
    updates = {
        name: theirs
        for name, (section, key) in {**SERVICE_SETTINGS, **SERVICE_DEFAULTS}.items()
        if name not in remote.asked and (theirs := _at(info, section, key)) is not None
    }
    settings = config.settings.model_copy(update=updates)
    options = replace(
        config.options, max_faces=settings.max_faces, min_face_size=settings.min_face_size
    )
    return replace(config, settings=settings, options=options, weights_id=weights_id(info))


def _check_options(config: RunConfig, plan: Plan, info: Mapping[str, Any]) -> None:
    """UsageError for what the service cannot do: more faces than its limit, a background
    network it has not loaded, an output format it does not write."""
    remote = config.remote
    assert remote is not None
    limit = _at(info, "limits", "max_faces")
    asked = config.settings.max_faces
    if limit is not None and "max_faces" in remote.asked and asked > limit:
        raise UsageError(f"--max-faces {asked} is over {remote.url}'s limit ({limit})")
    background = config.options.background
    loaded = _at(info, "model", "backgrounds")
    if background != "none" and loaded is not None and background not in loaded:
        have = ", ".join(sorted(loaded)) or "none"
        raise UsageError(
            f"--background {background} is not loaded on {remote.url} (loaded: {have}); "
            f"the service loads it at start with OSDFACE_BACKGROUND_MODELS='[\"{background}\"]'"
        )
    allowed = _at(info, "limits", "allowed_formats")
    if allowed is None:
        return
    allowed = {normalize_format(f) for f in allowed}
    for job in plan.jobs:
        fmt = job.output_format
        if job.kind == "image" and fmt is not None and fmt not in allowed:
            raise UsageError(
                f"{remote.url} does not write {fmt} ({job.name}); it writes "
                f"{', '.join(sorted(allowed))}: choose one with --format"
            )


def weights_id(info: Mapping[str, Any]) -> str:
    """A short id of the service's weights: the files and checksums its /v1/info lists (the
    ledger's `weights` value, so a re-run against other weights redoes its outputs)."""
    files = _at(info, "model", "files") or {}
    backgrounds = _at(info, "model", "backgrounds") or {}
    text = json.dumps([files, sorted(backgrounds)], sort_keys=True, default=str)
    return "service:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def default_concurrency(info: Mapping[str, Any]) -> int:
    """Photos in flight: a full batch on the model while the service's CPU workers prepare the
    next, within its admission limit (more would only meet 429s)."""
    batch = _at(info, "batching", "max_batch_faces") or 1
    workers = _at(info, "batching", "cpu_workers") or 1
    inflight = _at(info, "batching", "max_inflight_requests")
    wanted = int(batch) + int(workers)
    return max(1, min(wanted, int(inflight)) if inflight else wanted)


def idempotency_key(path: Path, form: Mapping[str, str], chunk: int = 1 << 20) -> str:
    """A video job's Idempotency-Key: the clip's content and the job's fields, so a re-run
    after a crash asks for the same job (a service that keeps keys answers with it)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    digest.update(json.dumps(dict(form), sort_keys=True).encode())
    return "osdface-" + digest.hexdigest()[:40]
