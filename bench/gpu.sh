#!/usr/bin/env bash
# The GPU measurements in one prepared run, for a lent H100/H200: about 5 minutes,
# at most 7.5 (the tests stop at 120 s, the benchmark reports what it has at 310 s).
#
#   device tool:  command "bash bench/gpu.sh", carry [".whl"], timeout_s 480
#   here, first:  bash bench/gpu.sh --tiny     (CPU, tiny weights: checks the script, ~1 min)
#
# 1. the CUDA parity tests of tests/test_fastpath.py on tiny weights (graphs, streams, pinned
#    copies, fp16/bf16, 20-call repeatability with and without `overlap`);
# 2. bench/speed.py on full-size random weights written to /tmp in the released layout (merged):
#    the authors'-style baseline, then plain bf16, fast bf16/fp16, overlap fp16 and fast fp16
#    without subpixel upsampling at batch 1/4/8/16, the start-up to ready, and torch.compile
#    (bf16, batch 1) if time is left;
# 3. a short summary against the targets, printed last.
# Everything lands in $OUT: env.txt, pytest.log, bench.log, RESULTS.md, bench.json.
# The GPU image has torch and peft but not diffusers: .whl/ holds the wheels, nothing is fetched.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--tiny" ]]; then
  PY=${PY:-.venv/bin/python}
  OUT=${OUT:-/tmp/osdface-gpu-tiny}
  BENCH=(--tiny --device cpu --batch-sizes 1,2 --compile-batch-sizes 1 --repeats 2 --warmup 1
         --configs plain:float32,fast:float32,fast:bfloat16,compile:float32)
else
  # .whl/ is shared with other areas; if its full set does not install, take only what this
  # benchmark needs (diffusers and its one dependency the image lacks).
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    || python3 -m pip install -q --no-index --no-deps --target /tmp/site \
         .whl/diffusers-*.whl .whl/importlib_metadata-*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3
  OUT=${OUT:-/tmp/osdface-gpu-out}
  BENCH=(--device cuda --batch-sizes 1,4,8,16 --compile-batch-sizes 1 --repeats 20 --warmup 3
         --configs plain:bfloat16,fast:bfloat16,fast:float16,overlap:float16,nosubpixel:float16,compile:bfloat16
         --weights-dir /tmp/osdface-bench-weights)
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import torch, diffusers, peft; print("torch", torch.__version__, "diffusers",
diffusers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())'
} > "$OUT/env.txt" 2>&1
tail -n 1 "$OUT/env.txt"

echo "== CUDA parity tests (tiny weights)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_fastpath.py -k cuda \
  > "$OUT/pytest.log" 2>&1
echo "pytest exit $?: $(tail -n 1 "$OUT/pytest.log")"

echo "== benchmark"
# SIGTERM at the limit makes the harness report what it measured so far.
timeout -s TERM 310 "$PY" -m bench.speed "${BENCH[@]}" --time-budget 200 \
  --results "$OUT/RESULTS.md" --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
status=$?
grep -E "bench (baseline|ours .*(batch|failed)|start-up)|Error|Traceback|interrupted|failed" \
  "$OUT/bench.log" | cut -c 1-180 | tail -n 30
cat "$OUT/RESULTS.md" 2>/dev/null

echo "== summary (bench exit $status)"
if [[ -f "$OUT/bench.json" ]]; then
  "$PY" -m bench.speed --summarize "$OUT/bench.json"
else
  echo "no bench.json: see bench.log"; tail -n 30 "$OUT/bench.log"
fi
