"""Instance segmentation, privately and from scratch: YOLO26n-seg on the embedded digits (ink outlines).

No public segmentation weights are made offline, so the model starts from its yaml: DP mode then puts
GroupNorm in place of BatchNorm (``norm="auto"``). With internet, start from Ultralytics' COCO
weights instead (``YOLO("yolo26n-seg.pt")``): BatchNorm then stays, frozen at its pretrained statistics.
"""

from __future__ import annotations

import ultralytics_dp  # noqa: F401  (embedded dataset names and the DP keys, before Ultralytics is imported)
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy


def main() -> None:
    model = YOLO("yolo26n-seg.yaml")
    dp = DifferentialPrivacy(epsilon=8.0, delta=1e-5).attach(model)
    metrics = model.train(data="digits-seg", epochs=10, imgsz=128, workers=0, project="runs/examples",
                          name="private-seg", exist_ok=True)
    print(f"\ndigits-seg mask mAP50 {metrics.seg.map50:.3f} at epsilon={dp.epsilon:.3f}, delta={dp.delta:g} "
          f"({dp.steps} steps)")


if __name__ == "__main__":
    main()
