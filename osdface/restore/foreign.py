"""The flags of GFPGAN's and CodeFormer's inference scripts, met in `osdface restore`: the same
knob under another spelling is taken, saying the native spelling once; a knob that means
something else here is refused with one line on what to use instead. Never a usage dump for a
flag we know.

`translate` rewrites the words after `restore` before argparse sees them (no torch).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from osdface.common import UsageError

GFPGAN, CODEFORMER, BOTH = "GFPGAN's", "CodeFormer's", "GFPGAN's and CodeFormer's"

# CodeFormer's -w (--fidelity_weight) is a trade-off inside its network; --strength blends the
# restored face with the original after the network. Not the same knob, so never translated.
FIDELITY = (
    "{flag} is CodeFormer's fidelity weight (1 = keep the input's identity, 0 = most "
    "restoration); OSDFace has no such trade-off: it keeps identity at full restoration. "
    "--strength blends the restored face with the original instead (1 = fully restored, the "
    "default; 0 = the original; e.g. --strength 0.7)"
)


@dataclass(frozen=True)
class Foreign:
    """One foreign flag: `native(value)` -> our words, or `refuse(value)` -> the one line."""

    whose: str
    takes_value: bool = True
    native: Callable[[str | None], list[str]] | None = None
    refuse: Callable[[str, str | None], str] | None = None


def _background(value: str | None) -> list[str]:
    if value in ("realesrgan", "realesrgan-x2"):
        return ["--background", "realesrgan-x2"]  # both scripts use RealESRGAN_x2plus
    if value in (None, "none", "None"):
        return ["--background", "none"]
    raise UsageError(
        f"--bg_upsampler {value}: the backgrounds here are realesrgan-x2, realesrgan-x4 and "
        "none (write --background realesrgan-x2)"
    )


def _ext(value: str | None) -> list[str]:
    if value == "auto":
        return []  # the input's format: our default too
    return ["--format", value or "png"]


def _detector(value: str | None) -> list[str]:
    if value in ("retinaface_resnet50", "retinaface_mobile0.25"):
        return ["--detector", value]
    raise UsageError(
        f"--detection_model {value}: the detectors here are retinaface_resnet50 and "
        "retinaface_mobile0.25 (write --detector retinaface_mobile0.25)"
    )


def _fidelity(flag: str, value: str | None) -> str:
    return FIDELITY.format(flag=flag if value is None else f"{flag} {value}")


FOREIGN: dict[str, Foreign] = {
    "-i": Foreign(BOTH, native=lambda v: [v or ""]),
    "--input": Foreign(GFPGAN, native=lambda v: [v or ""]),
    "--input_path": Foreign(CODEFORMER, native=lambda v: [v or ""]),
    "--output_path": Foreign(CODEFORMER, native=lambda v: ["-o", v or ""]),
    "-s": Foreign(BOTH, native=lambda v: ["--upscale", v or ""]),
    "--only_center_face": Foreign(BOTH, False, native=lambda v: ["--only-center-face"]),
    "--bg_upsampler": Foreign(BOTH, native=_background),
    "--has_aligned": Foreign(CODEFORMER, False, native=lambda v: ["--aligned"]),
    "--ext": Foreign(GFPGAN, native=_ext),
    "--detection_model": Foreign(CODEFORMER, native=_detector),
    "-w": Foreign(CODEFORMER, refuse=_fidelity),
    "--fidelity_weight": Foreign(CODEFORMER, refuse=_fidelity),
    "--weight": Foreign(GFPGAN, refuse=_fidelity),
    "--face_upsample": Foreign(
        CODEFORMER,
        False,
        refuse=lambda f, v: (
            f"{f}: faces are restored at 512x512 and pasted at --upscale; for a sharper "
            "background use --background realesrgan-x2"
        ),
    ),
    "--bg_tile": Foreign(
        BOTH,
        refuse=lambda f, v: (
            f"{f} {v}: the background's tile size is the setting OSDFACE_BACKGROUND_TILE "
            f"(e.g. OSDFACE_BACKGROUND_TILE={v or 400})"
        ),
    ),
}
VERSION = re.compile(r"\d+(\.\d+)*")  # GFPGAN's `-v 1.3`: its model's version


@dataclass
class Translation:
    """The words argparse gets, and one note per foreign flag taken."""

    argv: list[str]
    notes: list[str] = field(default_factory=list)


def translate(words: list[str], known: Collection[str]) -> Translation:
    """`words` (after the command) in our spelling; UsageError for a knob that is not ours.

    `known`: the command's own option strings, which are never translated.
    """
    out = Translation([])
    k = 0
    while k < len(words):
        word = words[k]
        k += 1
        if word == "--":
            out.argv += words[k - 1 :]
            break
        flag, attached = _split(word, known)
        if word == "-v" and k < len(words) and _gfpgan_version(words[k]):
            raise UsageError(
                f"-v {words[k]} picks GFPGAN's model version; OSDFace has one model: drop it "
                "(here -v is --verbose)"
            )
        foreign = FOREIGN.get(flag) if flag not in known else None
        if foreign is None:
            out.argv.append(_dashed(word, known, out.notes))
            continue
        value = attached
        if foreign.takes_value and value is None:
            if k >= len(words):
                raise UsageError(f"{flag} ({foreign.whose}) needs a value")
            value, k = words[k], k + 1
        if foreign.refuse is not None:
            raise UsageError(foreign.refuse(flag, value))
        assert foreign.native is not None
        ours = foreign.native(value)
        out.argv += ours
        out.notes.append(f"{flag} is {foreign.whose} spelling: {_using(ours)}")
    return out


def _using(ours: list[str]) -> str:
    if not ours:
        return "the input's format is the default here"
    if not ours[0].startswith("-"):
        return f"inputs need no flag here; reading {ours[0]}"
    return f"using {' '.join(ours)}"


def _split(word: str, known: Collection[str]) -> tuple[str, str | None]:
    """'--ext=png' -> ('--ext', 'png'); '-s2' -> ('-s', '2'); other words as they are."""
    if word.startswith("--") and "=" in word:
        flag, value = word.split("=", 1)
        return flag, value
    short = word[:2]
    if len(word) > 2 and word[1] != "-" and short in FOREIGN and short not in known:
        return short, word[2:]
    return word, None


def _dashed(word: str, known: Collection[str], notes: list[str]) -> str:
    """GFPGAN-style underscores in one of our flags (`--save_faces`) -> `--save-faces`."""
    flag, sep, value = word.partition("=")
    if not flag.startswith("--") or "_" not in flag or flag in known:
        return word
    dashed = flag.replace("_", "-")
    if dashed not in known:
        return word
    notes.append(f"{flag} is spelt {dashed} here: using {dashed}")
    return dashed + sep + value


def _gfpgan_version(word: str) -> bool:
    return bool(VERSION.fullmatch(word)) and not Path(word).exists()
