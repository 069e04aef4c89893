"""Private YOLO26n-cls classification on the embedded digits-cls dataset (ImageFolder layout)."""

from __future__ import annotations

import ultralytics_dp  # noqa: F401  (sets Ultralytics' offline switches before it is imported)
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy


def main() -> None:
    model = YOLO("yolo26n-cls.yaml")
    dp = DifferentialPrivacy(epsilon=4.0, delta=1e-5, max_grad_norm=1.0, physical_batch=64)
    dp.attach(model)
    metrics = model.train(data="digits-cls", epochs=3, imgsz=32, batch=256, lr0=0.002, optimizer="AdamW",
                          workers=0, project="runs/examples", name="private-cls", exist_ok=True)
    print(f"\nprivate classification: epsilon={dp.epsilon:.3f} delta={dp.delta:g} steps={dp.steps} "
          f"top1={metrics.top1:.4f}")


if __name__ == "__main__":
    main()
