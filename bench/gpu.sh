#!/usr/bin/env bash
# The GPU measurements in one prepared run, for a lent H100/H200. Expected run time: about
# 5 minutes, at most 6 (the steps share a deadline at 5m40s). Give the device tool timeout_s 380:
# with the machine's start (1-2 minutes) a second run still fits in 15 minutes of device time,
# and a rerun on the same machine measures more (it reuses the weights the first run wrote).
#
#   here, first:  bash bench/gpu.sh --wheels   fills the git-ignored .whl/ (needs PyPI):
#                   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                     --implementation cp --platform manylinux_2_28_x86_64 \
#                     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#                     --dest .whl diffusers==<the version in requirements.lock>
#                 bash bench/gpu.sh --tiny     the same steps on the CPU, tiny weights, with the
#                                              packages the GPU image lacks hidden (minutes)
#   device tool:  command "bash bench/gpu.sh", carry [".whl"], timeout_s 380
#                 (bash bench/gpu.sh --compile adds torch.compile rows, for a run with time left)
#
# The image has Python 3.12, torch 2.11 + CUDA 13, peft, huggingface_hub, safetensors and
# pytest, not diffusers: gpu.sh carries exactly that (bench/gpu_image.py; the CUDA tests and the
# benchmark import nothing else the image lacks: tests/test_gpu_readiness.py checks it). The
# wheel goes to /tmp/osdface-site, appended after the image's site-packages (a .pth file), so
# the image's own packages come first.
#
# Steps, the most valuable first; each has a limit (timeout -k) and a failed one never stops
# the next:
# 1. the CUDA parity tests on tiny weights (80 s): graphs, streams, pinned copies, fp16/bf16,
#    20-call repeatability from a worker thread with and without `overlap`; meanwhile the
#    full-size random weights are written (released layout, converted and merged);
# 2. bench/speed.py, until the deadline (steps not started 60 s before it are skipped), at
#    batch 1/8/16: the authors'-style baseline (fp32, batch 1), fast fp16 (the service's
#    default), fast bf16, the start-up to ready, fast fp16 without channels_last, fast fp16
#    beside a detector-like load on the default stream with and without the worker's own
#    stream, plain bf16, overlap fp16, fast fp16 without subpixel upsampling (and compile bf16
#    at batch 1 with --compile). bench.json is rewritten after every row, and the report is
#    written whatever stops the run;
# 3. the summary against the targets, and what the run settles (docs/performance.md).
# Everything lands in $OUT: env.txt, pytest.log, weights.log, bench.log, RESULTS.md, bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."

CUDA_TESTS=(tests/test_fastpath.py tests/test_cuda_path.py)
CONFIGS=fast:float16,fast:bfloat16,startup:float16,nochannelslast:float16,busy:float16,busynostream:float16,plain:bfloat16,overlap:float16,nosubpixel:float16

case "${1:-}" in
  --wheels)
    exec .venv/bin/python -m bench.gpu_image download
    ;;
  --tiny)
    PY=${PY:-.venv/bin/python}
    OUT=${OUT:-/tmp/osdface-gpu-tiny}
    # The image's package set: a sitecustomize hides what it lacks, in every process started
    # from here (pytest, the benchmark, its start-up child).
    hook=$(mktemp -d)
    trap 'rm -rf "$hook"' EXIT
    printf 'from bench.gpu_image import hide_missing\n\nhide_missing()\n' > "$hook/sitecustomize.py"
    export PYTHONPATH=$hook:$PWD
    TOTAL=${TOTAL:-1200} TESTS_S=300 TINY=(--tiny)
    WEIGHTS=/tmp/osdface-gpu-tiny-weights
    BENCH=(--device cpu --batch-sizes 1,2 --repeats 1 --warmup 1
           --configs fast:float32,fast:bfloat16,startup:float32,nochannelslast:float32,busy:float32,plain:float32)
    ;;
  ""|--compile)
    PY=python3
    OUT=${OUT:-/tmp/osdface-gpu-out}
    [[ "${1:-}" == --compile ]] && CONFIGS+=,compile:bfloat16
    TOTAL=340 TESTS_S=80 TINY=()
    WEIGHTS=/tmp/osdface-bench-weights
    BENCH=(--device cuda --batch-sizes 1,8,16 --compile-batch-sizes 1 --repeats 20 --warmup 3
           --configs "$CONFIGS")
    site=/tmp/osdface-site
    wheels=$(python3 -m bench.gpu_image wheels) || exit 1
    # shellcheck disable=SC2086  # one path a line, no spaces
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" $wheels || { echo "gpu.sh: could not install $wheels"; exit 1; }
    purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if echo "$site" > "$purelib/osdface-gpu-wheels.pth"; then
      export PYTHONPATH=$PWD
    else  # a read-only image: ahead of its packages, which is safe while only diffusers is there
      echo "gpu.sh: cannot write to $purelib; $site goes on PYTHONPATH"
      export PYTHONPATH=$PWD:$site
    fi
    ;;
  *)
    echo "usage: bash bench/gpu.sh [--compile | --tiny | --wheels]"; exit 2
    ;;
esac
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, huggingface_hub, peft
print("python", sys.version.split()[0], "torch", torch.__version__, "huggingface_hub",
      huggingface_hub.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())'
  "$PY" -c 'import diffusers; print("diffusers", diffusers.__version__, "from", diffusers.__file__)'
} > "$OUT/env.txt" 2>&1
tail -n 2 "$OUT/env.txt"
if ! "$PY" -c 'import diffusers' 2>/dev/null; then
  echo "gpu.sh: diffusers does not import (see $OUT/env.txt): carry .whl, filled here by"
  echo "        'bash bench/gpu.sh --wheels'"
  exit 1
fi

echo "== CUDA parity tests (tiny weights); the benchmark's weights meanwhile"
timeout -k 10 $((TOTAL / 2)) "$PY" -m bench.fullsize ${TINY[@]+"${TINY[@]}"} "$WEIGHTS" \
  > "$OUT/weights.log" 2>&1 &
writer=$!
timeout -k 10 "$TESTS_S" "$PY" -m pytest -v -p no:cacheprovider "${CUDA_TESTS[@]}" -k cuda \
  > "$OUT/pytest.log" 2>&1
echo "pytest exit $?: $(tail -n 1 "$OUT/pytest.log")"
wait "$writer"
echo "weights exit $?: $(tail -n 1 "$OUT/weights.log" | cut -c 1-150)"

# What is left until the deadline, less the summary's 25 s and the 15 s a hung step may take.
limit=$((TOTAL - SECONDS - 40))
((limit < 90)) && limit=90
echo "== benchmark (${limit} s)"
# SIGTERM at the limit makes the harness write what it measured; KILL 15 s later if it hangs.
timeout -k 15 -s TERM "$limit" "$PY" -m bench.speed ${TINY[@]+"${TINY[@]}"} "${BENCH[@]}" \
  --weights-dir "$WEIGHTS" --time-budget $((limit - 60)) --startup-timeout 90 \
  --results "$OUT/RESULTS.md" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
status=$?
grep -E "bench (baseline|ours .*(batch|failed)|start-up)|Error|Traceback|interrupted|failed" \
  "$OUT/bench.log" | cut -c 1-180 | tail -n 30
cat "$OUT/RESULTS.md" 2>/dev/null

echo "== summary (bench exit $status)"
if [[ -f "$OUT/bench.json" ]]; then
  timeout -k 5 25 "$PY" -m bench.speed --summarize "$OUT/bench.json"
else
  echo "no bench.json: see bench.log"; tail -n 30 "$OUT/bench.log"
fi
