"""Before a private run records or spends anything: does this Ultralytics still compute what the
privacy argument relies on?

On the first ``IMAGES`` images of the run's own training set that have labels (augmented as the
run loads them; among the first ``LOOK`` images):

1. each image's loss from ``losses``, computed in a batch with the others, equals Ultralytics' own
   criterion for that image in a batch of one: nothing mixes images, and the per-image losses
   still mean what Ultralytics means;
2. the clipping back-end the run will use adds, for one image, a vector of norm <= C.

Either failing refuses the run in one line naming the Ultralytics version and the task: a release
outside the tested window, or a patched Ultralytics, never silently breaks the guarantee.

Privacy assumptions relied on here: the check reads a few private images and releases one bit
(the run goes on, or is refused with a message that names no image or value) before the first
step; an unchanged Ultralytics always passes, so the bit depends on the code, not on the data.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..losses.batch import select
from ..losses.per_image import batch_losses, check_supported
from ..mechanism.grouping import Groups

IMAGES = 2
LOOK = 32
RTOL, ATOL = 1e-3, 1e-5  # Ultralytics' BCE-with-logits against our softplus form, float32
NORM_SLACK = 1e-5  # a clipped image's norm may exceed C by float rounding only


def check(trainer: Any, clipped_sum: Any, max_grad_norm: float) -> None:
    """Run both checks on ``trainer``'s model and training set; ``clipped_sum`` is the run's
    back-end (``private_step.CLIPPED_SUM[method]``). A one-line ValueError if either fails."""
    import ultralytics

    model, dataset = trainer.model, trainer.train_loader.dataset
    task = check_supported(model)
    items = _labelled(dataset)
    collate = getattr(dataset, "collate_fn", None) or torch.utils.data.default_collate
    batch = trainer.preprocess_batch(collate(items))
    overlap = getattr(model.args, "overlap_mask", True) if hasattr(model, "args") else True
    ones = [select(batch, [i], overlap) for i in range(len(items))]

    def refuse(what: str) -> None:
        raise ValueError(f"DP self-check failed with Ultralytics {ultralytics.__version__} ({task}): {what}; "
                         "this Ultralytics is not one the per-image losses were verified with, so no private step "
                         "is taken: use a supported release (see docs/usage.md)")

    with torch.no_grad():
        ours = batch_losses(model, batch)
        theirs = torch.stack([_ultralytics_loss(model, one) for one in ones])
    if not torch.allclose(ours, theirs.to(ours.dtype), rtol=RTOL, atol=ATOL):
        refuse("an image's loss in a batch differs from Ultralytics' own loss of that image alone (the losses "
               "mix images, or mean something else)")
    sums, _ = clipped_sum(model, ones[0], max_grad_norm, Groups.uniform(1))
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in sums.values()]).double())
    if not norm <= max_grad_norm * (1 + NORM_SLACK):
        refuse(f"one image's clipped gradient has norm {float(norm):.4g} > C={max_grad_norm:g}")
    model.zero_grad(set_to_none=True)


def _ultralytics_loss(model: Any, one: dict) -> torch.Tensor:
    """Ultralytics' own criterion (a copy of the model's, at this epoch's branch weights) on a batch
    of one image: the sum of its weighted loss items."""
    criterion = copy.deepcopy(getattr(model, "criterion", None) or model.init_criterion())
    return criterion(model(one["img"]), one)[0].sum()


def _labelled(dataset: Any) -> list[Any]:
    """Up to ``IMAGES`` items of ``dataset`` with at least one label (boxes, or a class), among its
    first ``LOOK``; the first ``IMAGES`` items if fewer have labels."""
    items = [dataset[i] for i in range(min(LOOK, len(dataset)))]
    labelled = [item for item in items if torch.as_tensor(item["cls"]).numel() > 0]
    return (labelled if len(labelled) >= IMAGES else items)[:IMAGES]
