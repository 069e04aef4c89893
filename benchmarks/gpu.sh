#!/usr/bin/env bash
# One prepared run for a lent GPU (the `device` tool of the developers' library), about 6 minutes:
#   1. the private step on CUDA equals the CPU reference, and its noise has the right scale;
#   2. the step benchmark on CUDA for det26, det8 and cls (+ Opacus), detection at 320 and 640 px,
#      fp32 and bf16 autocast (seg26, obb26 and pose26 at 320 px fp32 only);
#   3. one epoch of a whole run, private vs non-private, with device=0.
# Each benchmark writes its own section of benchmarks/RESULTS.md (named by the card); all output
# goes to $OUT/gpu.log and the updated RESULTS.md to $OUT after each step, so a run cut short
# still returns what it finished.
#
#   bash benchmarks/gpu.sh
#   bash benchmarks/gpu.sh tune ARGS...     # only tuning runs (benchmarks/tune.py ARGS: --task, --jobs, configs) on CUDA;
#                                           # carry the public model in .gpu_cache/pretrained/ as well
#
# The device machine has torch but not this project's other dependencies and no network: put their
# wheels in .whl/ first (`pip download --no-deps -d .whl ultralytics==8.4.190 ultralytics-thop
# prv-accountant polars polars-runtime-32 opacus==1.6.0`), carry .whl with the run, and this script
# installs them into a private folder.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .whl/*.whl
    export PYTHONPATH="/tmp/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-/tmp/gpu-yolo-config} PYTHONUNBUFFERED=1
step() {  # name, command...: run it, log it, keep going on failure, keep RESULTS.md current in $OUT
    local name=$1; shift
    echo "=== $name ($(date -u +%T))" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG" || echo "FAILED: $name" | tee -a "$LOG"
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
}
if [ "${1:-}" = tune ]; then
    shift
    export ULTRALYTICS_DP_DATA="$PWD/.gpu_cache"
    step tune "$PY" benchmarks/tune.py --device 0 --out "$OUT/rows.jsonl" --ledger "$OUT/search.db" "$@"
    exit
fi
step gpu nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step cuda-check "$PY" benchmarks/cuda_check.py
step "steps 320 fp32" "$PY" benchmarks/bench_train.py --device cuda --imgsz 320 --amp fp32 --repeats 5
for imgsz in 320 640; do
    for amp in fp32 bf16; do
        [ "$imgsz$amp" = 320fp32 ] && continue
        step "steps $imgsz $amp" "$PY" benchmarks/bench_train.py --device cuda --imgsz "$imgsz" --amp "$amp" \
            --repeats 5 --cases det26,cls,det8
    done
done
step "whole run, device=0" "$PY" benchmarks/bench_run.py --device 0 --repeats 1
