"""Public pretraining, then private fine-tuning: YOLO26n detection on the embedded digits (`make demo`).

1. Pretrain non-privately on public data (digits typeset in matplotlib's fonts or written with a
   simulated pen; cached, so a second run reuses it). With internet, start from Ultralytics' COCO weights instead (``YOLO("yolo26n.pt")``).
2. Measure that public model on the private task's validation set (zero-shot).
3. Fine-tune it on the private handwritten digits with (epsilon, delta)-DP per training image, with
   the DP defaults (only model, data, epochs and epsilon are set) and print both side by side.
Offline, on the CPU.
"""

from __future__ import annotations

import argparse

import ultralytics_dp  # noqa: F401  (embedded dataset names and the DP keys, before Ultralytics is imported)
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.datasets.public_weights import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    args = parser.parse_args()

    weights = pretrained("digits-public-det")
    public = YOLO(weights).val(data="digits-det", imgsz=128, workers=0, plots=False, verbose=False)

    model = YOLO(weights)
    dp = DifferentialPrivacy(epsilon=args.epsilon, delta=1e-5).attach(model)
    private = model.train(data="digits-det", epochs=args.epochs, imgsz=128, workers=0, project="runs/demo",
                          name="private", exist_ok=True)
    print(f"\ndigits-det mAP50: public model only {public.box.map50:.3f} | after private fine-tuning "
          f"{private.box.map50:.3f} at epsilon={dp.epsilon:.3f}, delta={dp.delta:g} ({dp.steps} steps, "
          f"noise_multiplier={dp.noise_multiplier:.3f})")


if __name__ == "__main__":
    main()
