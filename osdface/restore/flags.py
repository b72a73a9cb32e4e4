"""The flags of `osdface restore`: settings (OSDFACE_*), the options every photo gets, video and
Ray. Each flag backed by a setting or an option field takes its range, default and variable
from the field (`osdface.common.add_field_flag`); osdface/restore/command.py reads them once.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from model.options import OptionFields
from model.runtime.settings import RuntimeSettings
from osdface.common import SETTING_FLAGS, add_field_flag
from osdface.restore import remote, video
from osdface.restore.config import DEFAULT_OUTPUT
from osdface.restore.plan import KINDS

DESCRIPTION = """\
`osdface restore`: faces in photos, folders and aligned crops; never over an original.

Everything a run needs is checked before torch is imported: arguments, settings, paths, output
collisions, and the presence of the weight and detector files. Then each input goes through the
same pipeline as the HTTP service (model/media/pipeline.py); a failing file is named and skipped.
"""

EXAMPLES = """examples:
  osdface restore photos/ -r                       every photo under photos/ -> results/, same tree
  osdface restore scans/*.jpg -o out --faces 0 --upscale 2 --report out/report.jsonl
  osdface restore --aligned crops/ --strength 0.7 -o restored_crops
  osdface restore - < face.jpg > restored.jpg      stdin to stdout
  osdface restore scans/ -o restored/ --ray         on a Ray cluster (docs/scale-out.md)
  osdface restore scans/ -o restored/ --url http://gpu-box:8000   through a running service
"""

# Flags backed by an option field (model/options.py OptionFields, which the HTTP form extends):
# same names, bounds and defaults. Their help is the command line's own words.
FORM_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--strength", "strength", "1 = fully restored, 0 = the original"),
    ("--upscale", "upscale", "output scale; default: the --background network's, else 1"),
    (
        "--background",
        "background",
        "how the background is upscaled: Lanczos (none), or Real-ESRGAN x2/x4 "
        "(`osdface weights fetch --background`)",
    ),
    (
        "--format",
        "output_format",
        "png, jpeg (or jpg), webp, heic or avif; default: the input's format when this build "
        "can write it, else png",
    ),
    (
        "--quality",
        "quality",
        "JPEG / lossy WebP quality; default: a JPEG input's own (read from its tables) when "
        "written as JPEG, else 95",
    ),
    ("--only-center-face", "only_center_face", "restore only the face nearest the centre"),
    (
        "--faces",
        "faces",
        "restore only these faces, e.g. 0,2: indices into the largest-first list of a run "
        "without --faces (as --report lists them)",
    ),
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `restore` command's parser with every flag (its function is set by command.py)."""
    p = sub.add_parser(
        "restore",
        help="restore faces in image files or folders",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    supported = ", ".join(s for suffixes in KINDS.values() for s in suffixes)
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help=f"files, folders, globs ({supported}), or -"
    )
    p.add_argument(
        "-o", "--output", help=f"output folder (default: {DEFAULT_OUTPUT}/; --ray: a URI too)"
    )
    p.add_argument("-r", "--recursive", action="store_true", help="also sub-folders; same tree")
    p.add_argument("--suffix", default="", help="added to output names (default: none)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo outputs that exist (default: skipped when made with the same settings)",
    )
    p.add_argument("--report", type=Path, help="write one JSON line per input to this file")
    p.add_argument("--aligned", action="store_true", help="inputs are aligned 512x512 crops")
    p.add_argument("--save-faces", action="store_true", help="also write aligned/restored crops")
    p.add_argument(
        "--compare",
        action="store_true",
        help="also write input | restored side by side (whole photo and each face) in compare/",
    )
    p.add_argument("--no-merge", action="store_true", help="keep the LoRA unmerged (slower)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no per-file lines")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # `osdface -v restore` stays on
        help="debug logging, tracebacks",
    )
    for flag, name, text in SETTING_FLAGS:
        add_field_flag(p, flag, name, RuntimeSettings.model_fields[name], text, env=True)
    for flag, name, text in FORM_FLAGS:
        add_field_flag(p, flag, name, OptionFields.model_fields[name], text, env=False)
    video.add_video_arguments(p)
    remote.add_remote_arguments(p)
    g = p.add_argument_group("Ray (photos on a cluster: docs/scale-out.md)")
    g.add_argument(
        "--ray",
        action="store_true",
        help="restore photos on a Ray cluster: the one at --ray-address, else RAY_ADDRESS's, "
        "else a local one",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the cluster to join with --ray: auto, ray://HOST:PORT or HOST:PORT",
    )
    g.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a local --ray cluster")
    p.set_defaults(positionals_anywhere="inputs")  # `a.jpg --ray b.jpg`: both are inputs
    return p


# What `ray.init` takes as an address: the old `--ray ADDRESS` form is refused by its shape.
RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|[\w.-]+:\d+|\[[0-9A-Fa-f:]+\]:\d+")


def old_ray_form(word: str) -> str:
    """The one line refusing the old `--ray ADDRESS` (or `--ray=ADDRESS`) form."""
    return f"--ray takes no address now: write --ray --ray-address {word}"


def explain_parse_error(message: str) -> str:
    """argparse's message about `--ray=ADDRESS`, said as what to write instead."""
    found = re.fullmatch(r"argument --ray: ignored explicit argument '(.*)'", message)
    return old_ray_form(found.group(1)) if found else message
