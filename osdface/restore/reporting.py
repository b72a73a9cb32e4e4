"""What `osdface restore` tells: progress, one line per failure, a summary, a JSON-lines report.

On a terminal: two tqdm bars (files, faces; rate and ETA). Otherwise (a log file, CI): one plain
log line per file. `quiet` drops both; failures and the summary are always logged.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

from osdface.common import plural
from osdface.restore.plan import Job

logger = logging.getLogger("osdface.restore")
# The run's last line, which -q keeps (osdface/cli.py): a logger of its own.
SUMMARY_LOGGER = "osdface.summary"

Status = Literal["restored", "skipped", "failed"]


@dataclass
class Record:
    """One input's outcome: one line of the `--report` file.

    A photo lists its faces (`faces`); a video counts them over its frames (`face_count`, with
    `frames` written), since one list per frame would be the whole track. `face_count` is set
    for both: `len(faces)` for a photo.
    """

    input: str
    output: str | None
    status: Status
    faces: list[dict[str, object]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    frames: int | None = None  # a video's frames written; None for a photo
    face_count: int | None = None  # faces restored; None: len(faces)
    retried: int = 0  # requests sent again (--url: 429, 503, a lost connection)

    def __post_init__(self) -> None:
        if self.face_count is None:
            self.face_count = len(self.faces)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Record:
        return cls(**json.loads(text))


def earlier_records(report: Path) -> dict[str, Record]:
    """The records of an existing report by input; a line cut short by a kill is passed over."""
    records: dict[str, Record] = {}
    try:
        lines = report.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return records
    for line in lines:
        try:
            record = Record.from_json(line)
        except (ValueError, TypeError):
            continue
        if record.status != "failed":
            records[record.input] = record
    return records


def reason(exc: BaseException) -> str:
    """One line for the log and the report: our errors' own message, others' kind too."""
    from model.errors import OSDFaceError

    text = " ".join(str(exc).split()) or "no message"
    return text if isinstance(exc, OSDFaceError) else f"{type(exc).__name__}: {text}"


def failed(job: Job, exc: BaseException) -> Record:
    """The record of an input that failed; a message that starts with the input's path (the
    video errors name their file) is not given the path a second time."""
    target = str(job.target) if job.target is not None else None
    error = reason(exc).removeprefix(f"{job.name}: ")
    return Record(job.name, target, "failed", error=error)


def face_json(face: Any) -> dict[str, Any]:
    """A DetectedFace as the HTTP API lists it: box, landmarks (x, y), score."""
    return face.to_json()


def found(record: Record, seconds: float) -> str:
    """'2 faces', or for a video '80 frames, 80 faces, 3.1 frames/s'."""
    faces = plural(record.face_count or 0, "face")
    if record.frames is None:
        return faces
    rate = record.frames / seconds if seconds > 0 else 0.0
    return f"{plural(record.frames, 'frame')}, {faces}, {rate:.1f} frames/s"


@dataclass
class Summary:
    restored: int = 0
    faces: int = 0
    skipped: int = 0
    failed: int = 0
    unsupported: int = 0
    retried: int = 0  # requests sent again, over all inputs (--url)
    started: float = field(default_factory=time.perf_counter)

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def add(self, record: Record) -> None:
        self.retried += record.retried if record.status != "skipped" else 0
        if record.status == "restored":
            self.restored += 1
            self.faces += record.face_count or 0
        elif record.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        per_face = f"{elapsed / self.faces:.2f} s per face" if self.faces else "no faces"
        return (
            f"{plural(self.restored, 'file')} restored, {plural(self.faces, 'face')}, "
            f"{self.skipped} skipped (output exists), {self.failed} failed, "
            f"{self.unsupported} unsupported; {elapsed:.1f} s, {per_face}"
        ) + (f"; {plural(self.retried, 'request')} retried" if self.retried else "")

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


class Reporter:
    """Progress bars or log lines, the report file and the summary of one run."""

    def __init__(self, total: int, *, quiet: bool, tty: bool, report: Path | None) -> None:
        self.summary = Summary()
        self.quiet, self.tty = quiet, tty
        # Read before the file is rewritten: a resumed run's skipped inputs keep what the run
        # that wrote their outputs found (faces, timings) instead of an empty record.
        self._earlier = earlier_records(report) if report is not None else {}
        self._report: IO[str] | None = report.open("w") if report is not None else None
        self._files: Any = None  # tqdm bars on a terminal
        self._faces: Any = None
        if tty and not quiet and total:
            from tqdm import tqdm

            self._files = tqdm(total=total, unit="file", desc="files", position=0)
            self._faces = tqdm(total=0, unit="face", desc="faces", position=1)
        self._total, self._done = total, 0

    def redirect_logging(self) -> AbstractContextManager[object]:
        """Log lines printed above the bars instead of through them."""
        if self._files is None:
            return nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()

    def faces_found(self, count: int) -> None:
        if self._faces is not None and count:
            self._faces.total += count
            self._faces.refresh()

    def faces_done(self, count: int) -> None:
        if self._faces is not None and count:
            self._faces.update(count)

    def record(self, record: Record) -> None:
        if record.status == "skipped":
            record = self._with_earlier_findings(record)
        self.summary.add(record)
        self._done += record.status != "skipped"
        if self._report is not None:
            self._report.write(record.to_json() + "\n")
            self._report.flush()
        if record.status == "failed":
            logger.error("FAILED %s: %s", record.input, record.error)
        elif record.status == "restored" and not self.quiet and not self.tty:
            seconds = sum(record.timings.values())
            logger.info(
                "[%d/%d] %s: %s -> %s (%.1f s)",
                self._done,
                self._total,
                record.input,
                found(record, seconds),
                record.output,
                seconds,
            )
        if self._files is not None and record.status != "skipped":
            self._files.update(1)

    def _with_earlier_findings(self, record: Record) -> Record:
        earlier = self._earlier.get(record.input)
        if earlier is None or earlier.output != record.output or not earlier.face_count:
            return record
        return replace(
            record,
            faces=earlier.faces,
            timings=earlier.timings,
            frames=earlier.frames,
            face_count=earlier.face_count,
        )

    def close(self) -> None:
        for bar in (self._faces, self._files):
            if bar is not None:
                bar.close()
        if self._report is not None:
            self._report.close()
        logging.getLogger(SUMMARY_LOGGER).info("%s", self.summary.line())
