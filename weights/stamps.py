"""Up-to-date checks for `weights convert` and `merge`: the sha256 of their inputs, recorded.

A stamp is a small JSON file beside the outputs: {"inputs": {name: {size, mtime_ns, sha256}},
"outputs": {name: {size, mtime_ns}}}. An input whose size and mtime are as recorded is not hashed
again (as make and rsync trust them), so a second `make serve` neither re-reads nor rewrites
gigabytes. A changed input is hashed; the outputs are current only if every hash matches and the
outputs are the files that were written then (not replaced since, e.g. by a training export).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from model.atomic import write_atomic
from weights.layout import SAFETENSORS_NAME, WeightsLayout, require, sha256_file

logger = logging.getLogger(__name__)

Record = dict[str, dict[str, int | str]]
STAMP_NAME = "inputs.json"  # beside the outputs: the sha256 of what they were made from


class Step:
    """Inputs, outputs and stamp of `convert` or `merge` in one weights folder (no torch)."""

    def __init__(self, inputs: dict[str, Path], outputs: list[Path], stamp: Path) -> None:
        self.inputs, self.outputs, self.stamp = inputs, outputs, stamp

    @classmethod
    def convert(cls, layout: WeightsLayout) -> Step:
        inputs = {
            layout.released_vre.name: require(layout.released_vre, "OSDFace associate_2.ckpt"),
            layout.released_projection.name: require(
                layout.released_projection, "embedding_change_weights.pth"
            ),
        }
        return cls(inputs, [layout.vre], layout.osdface / f"vre.{STAMP_NAME}")

    @classmethod
    def merge(cls, layout: WeightsLayout) -> Step:
        inputs = {
            "unet/config.json": layout.unet_dir / "config.json",
            f"unet/{SAFETENSORS_NAME}": layout.unet_dir / SAFETENSORS_NAME,
            "lora": layout.lora,
        }
        if (layout.osdface / "config.json").is_file():  # LoRA rank and alpha
            inputs["osdface/config.json"] = layout.osdface / "config.json"
        out = layout.merged_unet_dir
        return cls(inputs, [out / SAFETENSORS_NAME, out / "config.json"], out / STAMP_NAME)

    def is_current(self) -> bool:
        return is_current(self.stamp, self.outputs, self.inputs)

    def done(self, record: Record | None = None) -> None:
        """Record the inputs (fingerprinted before the work started, if given) after the work."""
        write_stamp(self.stamp, record or fingerprint(self.inputs), self.outputs)


def fingerprint(inputs: dict[str, Path], previous: Record | None = None) -> Record:
    """{name: {size, mtime_ns, sha256}}; hashes of unchanged files are taken from `previous`."""
    record: Record = {}
    for name, path in sorted(inputs.items()):
        stat = path.stat()
        old = (previous or {}).get(name, {})
        if old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns:
            digest = str(old["sha256"])
        else:
            digest = sha256_file(path)
        record[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return record


def _stats(outputs: list[Path]) -> dict[str, dict[str, int]]:
    return {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in outputs}


def read_stamp(stamp: Path) -> dict[str, Record] | None:
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("inputs"), dict)
    return data if ok else None


def is_current(stamp: Path, outputs: list[Path], inputs: dict[str, Path]) -> bool:
    """True when the outputs are those written from inputs with the recorded hashes."""
    recorded = read_stamp(stamp)
    if recorded is None or not all(p.is_file() for p in outputs):
        return False
    if recorded.get("outputs") != _stats(outputs):
        return False
    old = recorded["inputs"]
    if set(old) != set(inputs) or not all(p.is_file() for p in inputs.values()):
        return False
    now = fingerprint(inputs, old)
    if any(now[n]["sha256"] != old[n]["sha256"] for n in inputs):
        return False
    if now != old:
        write_stamp(stamp, now, outputs)  # same content, new mtimes (a copy, a touch)
    return True


def write_stamp(stamp: Path, inputs: Record, outputs: list[Path]) -> None:
    """Atomically, after the outputs: a crash between the two leaves outputs never trusted."""
    data = {"inputs": inputs, "outputs": _stats(outputs)}
    write_atomic(stamp, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
