#!/usr/bin/env bash
# Private fine-tuning from the command line: the stock `yolo` command plus the DP keys (epsilon,
# delta, max_grad_norm, noise_multiplier, physical_batch, augmult, ...). Run from the repository root
# after `make demo` (which caches the public model this starts from).
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
YOLO=${YOLO:-.venv/bin/yolo}
YOLO_DP=${YOLO_DP:-.venv/bin/yolo-dp}

# public weights: trained non-privately on the font-rendered public digits (cached after the first run)
WEIGHTS=$("$PYTHON" -c "from ultralytics_dp.datasets.public_weights import DEMO_DETECTOR, pretrained; print(pretrained('digits-public-det', **DEMO_DETECTOR))")

# plan first: which noise multiplier spends epsilon=8 over 5 epochs of 1,000 images at the default batch (750)?
"$YOLO_DP" privacy n=1000 batch=750 epochs=5 delta=1e-5 epsilon=8

# every training argument not given here takes its DP default (docs/useful-models.md)
"$YOLO" train model="$WEIGHTS" data=digits-det epochs=5 imgsz=128 workers=0 epsilon=8 \
    project=runs/examples name=private-cli exist_ok=True

"$YOLO_DP" report runs/examples/private-cli/weights/last.pt

# oriented boxes from scratch (no public OBB weights offline: DP mode trains GroupNorm in place of BatchNorm)
"$YOLO" obb train model=yolo26n-obb.yaml data=digits-obb epochs=5 imgsz=128 workers=0 epsilon=8 \
    project=runs/examples name=private-obb-cli exist_ok=True

# pose from scratch on the embedded digits' 5 keypoints (YOLOv8/YOLO11 pose models work the same way)
"$YOLO" pose train model=yolo26n-pose.yaml data=digits-pose epochs=5 imgsz=128 workers=0 epsilon=8 \
    project=runs/examples name=private-pose-cli exist_ok=True
