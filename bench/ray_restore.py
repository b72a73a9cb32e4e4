"""Photos per second: the local `osdface restore` against `osdface restore --ray`, same photos.

    python -m bench.ray_restore --tiny --inputs 32                      # this machine, CPU
    python -m bench.ray_restore --weights W --inputs 400 --device cuda  # a GPU machine

Copies real photos (../shared/assets, or OSDFACE_TEST_ASSETS) into --inputs files, then runs
both commands as a user would (fresh processes, model loading and, for --ray, the local
cluster's start included), each into its own empty folder. Reports wall time and photos/s of
each, faces restored, and from the --ray report the CPU-stage seconds per photo (decode, detect,
align, paste, encode) and the restorer's seconds per face: the two numbers that size a cluster
(CPU cores per GPU = GPU photos/s x CPU s/photo). Appends a section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.inputs import assets, weights_folder

REPO = Path(__file__).resolve().parents[1]
PHOTOS = (
    "gfpgan/cropped_faces/Adele_crop.png",
    "gfpgan/cropped_faces/Justin_Timberlake_crop.png",
    "vqfr/cropped_faces/Eliane_Karp_0001_00_lq.png",
    "gfpgan/whole_imgs/Blake_Lively.jpg",
    "gfpgan/whole_imgs/10045.png",
    "vqfr/whole_imgs/example.jpg",
)
CPU_STAGES = ("decode", "detect", "align", "paste", "encode")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inputs", type=int, default=32, help="files, copies of the photos in turn")
    p.add_argument("--tiny", action="store_true", help="tiny random weights (tests/tiny_weights)")
    p.add_argument("--weights", type=Path, help="a weights folder (instead of --tiny)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--detector", default="retinaface_mobile0.25")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    p.add_argument("--results", type=Path, default=REPO / "bench/RESULTS.md")
    p.add_argument("--note", default="", help="a sentence added to the results section")
    return p.parse_args()


def make_inputs(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for k in range(count):
        source = assets() / "images" / PHOTOS[k % len(PHOTOS)]
        shutil.copyfile(source, folder / f"{k:04d}_{source.name}")


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="osdface-ray-bench-"))
    weights = weights_folder(args.weights, args.tiny, work / "weights")
    inputs = work / "inputs"
    make_inputs(inputs, args.inputs)
    common = ["--weights", str(weights), "--device", args.device, "--detector", args.detector]
    common += ["--batch-size", str(args.batch_size)]
    osdface = [sys.executable, "-m", "osdface", "restore", str(inputs)]
    local = [*osdface, "-o", str(work / "local"), *common]
    report = work / "ray.jsonl"
    ray = [*osdface, "-o", str(work / "ray"), *common, "--report", str(report)]
    ray += [*(["--ray-cpus", str(args.ray_cpus)] if args.ray_cpus else []), "--ray"]

    local_s = timed(local)
    ray_s = timed(ray)
    records = [json.loads(line) for line in report.read_text().splitlines()]
    restored = [r for r in records if r["status"] == "restored"]
    faces = sum(len(r["faces"]) for r in restored)
    cpu_s = sum(sum(r["timings"].get(s, 0.0) for s in CPU_STAGES) for r in restored)
    model_s = sum(r["timings"].get("restore", 0.0) for r in restored)
    rows = {
        "local": (local_s, len(list((work / "local").iterdir()))),
        "--ray": (ray_s, len(restored)),
    }
    section = results_section(args, rows, faces, cpu_s / len(restored), model_s / max(faces, 1))
    section += f"\n`{shlex.join(['python', '-m', 'bench.ray_restore', *sys.argv[1:]])}`\n"
    print(section)
    with args.results.open("a") as f:
        f.write("\n" + section)
    shutil.rmtree(work, ignore_errors=True)


def results_section(args, rows, faces: int, cpu_per_photo: float, model_per_face: float) -> str:
    load = os.getloadavg()[0]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### {when}: local CLI vs --ray, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (load average {load:.1f} at the end)",
        "",
        f"{args.inputs} photos ({faces} faces), {'tiny' if args.tiny else 'given'} weights, "
        f"{args.device}, {args.detector}, batch {args.batch_size}; wall time of the whole "
        "command (start-up, model loading and for --ray the local cluster included).",
        "",
        "| command | wall s | photos | photos/s |",
        "|---|---|---|---|",
    ]
    for name, (seconds, photos) in rows.items():
        lines.append(f"| {name} | {seconds:.1f} | {photos} | {photos / seconds:.3f} |")
    lines += [
        "",
        f"From the --ray report: CPU stages {cpu_per_photo:.2f} s per photo "
        f"({', '.join(CPU_STAGES)}); restorer {model_per_face:.2f} s per face.",
    ]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
