#!/usr/bin/env bash
# Private training from the command line: `yolo` syntax plus the DP keys (epsilon, delta,
# max_grad_norm, noise_multiplier, physical_batch). Run from the repository root after `make demo`.
set -euo pipefail
YOLO_DP=${YOLO_DP:-.venv/bin/yolo-dp}

# plan first: which noise multiplier spends epsilon=8 over 3 epochs of 1,000 images at batch 128?
"$YOLO_DP" privacy n=1000 batch=128 epochs=3 delta=1e-5 epsilon=8

"$YOLO_DP" train model=yolo26n.yaml data=digits-det epochs=3 imgsz=128 batch=128 workers=0 \
    epsilon=8 delta=1e-5 max_grad_norm=1.0 physical_batch=32 project=runs/examples name=private-cli exist_ok=True

"$YOLO_DP" report runs/examples/private-cli/weights/last.pt
