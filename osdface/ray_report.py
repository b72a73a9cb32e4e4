"""What `osdface restore --ray` tells: one JSON line per input (`--report`), failures named in
the log, a summary line, and the exit code (0 all restored or skipped, 1 any failed)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

logger = logging.getLogger("osdface.restore")

Status = Literal["restored", "skipped", "failed"]


@dataclass
class Record:
    """One input's outcome: one line of the report."""

    input: str
    output: str | None
    status: Status
    faces: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def failed(cls, source: str, target: str, error: str) -> Record:
        return cls(source, target, "failed", error=error)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Record:
        return cls(**json.loads(text))


def face_json(face: Any) -> dict[str, Any]:
    """A DetectedFace as the HTTP API lists it: box, landmarks, score."""
    return {
        "box": [round(float(v), 2) for v in face.box],
        "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
        "score": round(float(face.score), 4),
    }


def failure(exc: BaseException) -> str:
    """`ExceptionType: message`, one line, for the log and the report."""
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"


@dataclass
class Summary:
    restored: int = 0
    faces: int = 0
    skipped: int = 0
    failed: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, record: Record) -> None:
        if record.status == "restored":
            self.restored += 1
            self.faces += len(record.faces)
        elif record.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = f"{self.restored / elapsed:.2f} photos/s" if self.restored else "nothing restored"
        return (
            f"{self.restored} files restored, {self.faces} faces, {self.skipped} skipped "
            f"(output exists), {self.failed} failed; {elapsed:.1f} s, {rate}"
        )

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


class Reporter:
    """The report file (flushed per line, so a killed run keeps what it did) and the summary."""

    def __init__(self, report: Path | None) -> None:
        self.summary = Summary()
        self._file: IO[str] | None = report.open("w") if report is not None else None

    def record(self, record: Record) -> None:
        self.summary.add(record)
        if self._file is not None:
            self._file.write(record.to_json() + "\n")
            self._file.flush()
        if record.status == "failed":
            logger.error("FAILED %s: %s", record.input, record.error)
        elif record.status == "restored":
            logger.info("%s: %d faces -> %s", record.input, len(record.faces), record.output)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        logger.info("%s", self.summary.line())
