#!/usr/bin/env bash
# One prepared run for a lent GPU (the `device` tool of the developers' library): the step benchmark
# on CUDA for det26, det8 and cls, detection at 320 and 640 px, fp32 and bf16 autocast, with Opacus
# on the classification case, then one whole private run with device=0. Each setting writes its own section of benchmarks/RESULTS.md (named by
# the card); the updated file and the logs are copied to $OUT.
#
#   bash benchmarks/gpu.sh            # about 10 minutes on an H100
#
# The device machine has torch but not this project's other dependencies and no network: put their
# wheels in .whl/ first (`pip download --no-deps -d .whl ultralytics==8.4.190 ultralytics-thop
# prv-accountant polars polars-runtime-32 opacus==1.6.0`), carry .whl with the run, and this script
# installs them into a private folder.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .whl/*.whl
    export PYTHONPATH="/tmp/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export YOLO_CONFIG_DIR=${YOLO_CONFIG_DIR:-/tmp/gpu-yolo-config} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for imgsz in 320 640; do
    for amp in fp32 bf16; do
        "$PY" benchmarks/bench_train.py --device cuda --imgsz "$imgsz" --amp "$amp" --repeats 5 \
            2>&1 | tee "$OUT/steps-$imgsz-$amp.log" || echo "failed: $imgsz $amp" | tee -a "$OUT/failures.txt"
    done
done
# issue 17: the single-GPU path of a whole private run (device=0), once: its last lines are the result
"$PY" -c "import ultralytics_dp; from ultralytics import YOLO; YOLO('yolo26n.yaml').train(data='digits-det', \
epochs=1, imgsz=128, batch=32, fraction=0.25, device=0, epsilon=8, ledger=False, plots=False, workers=2, \
project='/tmp/gpu-runs', name='private', exist_ok=True)" 2>&1 | tail -n 25 | tee "$OUT/private-run-device0.log" \
    || echo "failed: private run on device=0" | tee -a "$OUT/failures.txt"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
