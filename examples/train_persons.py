"""The person as the privacy unit: YOLO26n-cls fine-tuned on digits written by simulated writers.

``digits-persons-cls`` deals the handwritten digits to writers (synthetic persons, five images
each, each writer with their own style) and ships ``persons.csv`` naming every image's writer. The
same budget is spent twice: per image (with the persons file, so the run also states what it
means for a writer) and per person (every writer with all of their images protected at epsilon).
"""

from __future__ import annotations

import ultralytics_dp  # noqa: F401  (embedded dataset names and the DP keys, before Ultralytics is imported)
from ultralytics import YOLO

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.datasets.public_weights import pretrained

EPSILON = 3.0


def train(**unit: str) -> tuple[float, DifferentialPrivacy]:
    model = YOLO(pretrained("digits-public-cls"))
    dp = DifferentialPrivacy(epsilon=EPSILON, delta=1e-4, persons="persons.csv", **unit).attach(model)
    metrics = model.train(data="digits-persons-cls", epochs=5, imgsz=32, workers=0, project="runs/examples",
                          name=f"persons-{unit.get('privacy_unit', 'image')}", exist_ok=True)
    return metrics.top1, dp


def main() -> None:
    per_image, image_run = train()
    per_person, person_run = train(privacy_unit="person")
    writer = image_run.person_epsilon()
    print(f"\nper image:  top-1 {per_image:.3f}, epsilon={image_run.epsilon:.3f} per image; a writer with "
          f"{writer['images_per_person']} images: epsilon <= {writer['epsilon']:.1f}")
    print(f"per person: top-1 {per_person:.3f}, epsilon={person_run.epsilon:.3f} per writer, all of their images")


if __name__ == "__main__":
    main()
