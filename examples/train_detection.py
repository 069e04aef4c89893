"""Private YOLO26n detection on the embedded digits-det dataset: `make demo` runs this.

(epsilon=8, delta=1e-5)-DP per training image, offline, on the CPU, within minutes.
"""

from __future__ import annotations

import argparse

import ultralytics_dp  # noqa: F401  (sets Ultralytics' offline switches before it is imported)
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    args = parser.parse_args()

    model = YOLO("yolo26n.yaml")  # built from the packaged yaml: nothing is downloaded
    dp = DifferentialPrivacy(epsilon=args.epsilon, delta=1e-5, max_grad_norm=1.0, physical_batch=32)
    dp.attach(model)
    metrics = model.train(data="digits-det", epochs=args.epochs, imgsz=128, batch=128, lr0=0.002, optimizer="AdamW",
                          workers=0, project="runs/demo", name="private", exist_ok=True)
    print(f"\nprivate detection: epsilon={dp.epsilon:.3f} delta={dp.delta:g} steps={dp.steps} "
          f"noise_multiplier={dp.noise_multiplier:.3f} mAP50={metrics.box.map50:.4f}")


if __name__ == "__main__":
    main()
