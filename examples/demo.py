"""`make demo`: train YOLO26n on the embedded digits-det dataset, offline, on the CPU."""

from __future__ import annotations

import ultralytics_dp  # noqa: F401  (sets Ultralytics' offline switches before it is imported)
from ultralytics import YOLO

from ultralytics_dp import datasets
from ultralytics_dp.offline import patch_ultralytics


def main() -> None:
    patch_ultralytics()
    model = YOLO("yolo26n.yaml")
    metrics = model.train(data=datasets.resolve("digits-det"), epochs=3, imgsz=128, batch=32,
                          workers=0, plots=False, project="runs/demo", name="baseline", exist_ok=True)
    print(f"non-private baseline: mAP50={metrics.box.map50:.4f}")


if __name__ == "__main__":
    main()
