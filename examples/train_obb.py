"""Oriented boxes, privately and from scratch: YOLO26n-obb on the embedded turned digits.

No public OBB weights are made offline, so the model starts from its yaml: DP mode then puts
GroupNorm in place of BatchNorm (``norm="auto"``). With internet, start from Ultralytics' DOTA
weights instead (``YOLO("yolo26n-obb.pt")``): BatchNorm then stays, frozen at its pretrained statistics.
"""

from __future__ import annotations

import ultralytics_dp  # noqa: F401  (embedded dataset names and the DP keys, before Ultralytics is imported)
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy


def main() -> None:
    model = YOLO("yolo26n-obb.yaml")
    dp = DifferentialPrivacy(epsilon=8.0, delta=1e-5).attach(model)
    metrics = model.train(data="digits-obb", epochs=10, imgsz=128, workers=0, project="runs/examples",
                          name="private-obb", exist_ok=True)
    print(f"\ndigits-obb mAP50 {metrics.box.map50:.3f} at epsilon={dp.epsilon:.3f}, delta={dp.delta:g} "
          f"({dp.steps} steps)")


if __name__ == "__main__":
    main()
