"""Public pretraining, then private fine-tuning: YOLO26n-cls on the embedded digits (ImageFolder layout).

The public model is trained non-privately on digits typeset in matplotlib's fonts or written with a
simulated pen (cached); with internet, start from Ultralytics' ImageNet weights instead
(``YOLO("yolo26n-cls.pt")``).
"""

from __future__ import annotations

import ultralytics_dp  # noqa: F401  (embedded dataset names and the DP keys, before Ultralytics is imported)
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.datasets.public_weights import pretrained


def main() -> None:
    weights = pretrained("digits-public-cls")
    public = YOLO(weights).val(data="digits-cls", imgsz=32, workers=0, plots=False, verbose=False)
    model = YOLO(weights)
    dp = DifferentialPrivacy(epsilon=8.0, delta=1e-5).attach(model)
    private = model.train(data="digits-cls", epochs=5, imgsz=32, workers=0, project="runs/examples",
                          name="private-cls", exist_ok=True)
    print(f"\ndigits-cls top-1: public model only {public.top1:.3f} | after private fine-tuning {private.top1:.3f} "
          f"at epsilon={dp.epsilon:.3f}, delta={dp.delta:g} ({dp.steps} steps)")


if __name__ == "__main__":
    main()
