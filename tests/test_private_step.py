"""One private step: clipped sums over physical chunks, one noise draw, division by q*N."""

from __future__ import annotations

import pytest
import torch

from ultralytics_dp.losses.per_image import batch_losses, per_image_loss_fn, sample_batch
from ultralytics_dp.mechanism.gaussian import clipped_grad_sum
from ultralytics_dp.integration.private_step import private_gradient
from ultralytics_dp.losses.batch import select
from ultralytics_dp.mechanism.grouping import Groups
from ultralytics_dp.mechanism.sampling import RECORD_SIZES

from helpers import det_batch, image, trainer_model


def test_private_gradient_divides_by_the_expected_batch_size():
    """The realised Poisson batch size is private: the step divides by q*N, never by B."""
    model = trainer_model("yolo26n-cls.yaml")
    batch = {"img": torch.rand(3, 3, 32, 32), "cls": torch.tensor([1, 2, 3])}
    grad = private_gradient(model, batch, method="ghost", max_grad_norm=0.5, noise_multiplier=0.0,
                            expected_batch_size=10.0, physical_batch=2)
    total, _ = clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, batch), max_grad_norm=0.5)
    for k in total:
        assert torch.allclose(grad[k], total[k] / 10.0, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_physical_chunks_give_the_sum_of_each_image_alone(method):
    """Chunks re-index the detection labels: the step over chunks of 2 equals the sum of each
    image's clipped gradient computed alone (a naive loop), for either back-end."""
    model = trainer_model("yolo26n.yaml")
    batch = det_batch([2, 0, 3, 1, 1])
    grad = private_gradient(model, batch, method=method, max_grad_norm=0.05, noise_multiplier=0.0,
                            expected_batch_size=1.0, physical_batch=2)
    alone = [clipped_grad_sum(model, per_image_loss_fn(model), sample_batch(model, image(batch, i)),
                              max_grad_norm=0.05)[0] for i in range(5)]
    for k in grad:
        expected = sum(a[k] for a in alone)
        assert torch.allclose(grad[k], expected, rtol=1e-4, atol=1e-7), k



def _batch(cfg: str, n: int) -> dict:
    if cfg.endswith("-cls.yaml"):
        torch.manual_seed(0)
        return {"img": torch.rand(n, 3, 32, 32), "cls": torch.randint(0, 4, (n,))}
    return det_batch([2, 1, 0, 1, 3, 2, 1][:n])


def _naive_record_sum(model, batch: dict, sizes: list[int], c: float) -> tuple[dict, list[float]]:
    """Each record alone: autograd of the mean of its images' batch-of-one losses, clipped, summed."""
    from ultralytics_dp.mechanism.grad_sample import trainable_params
    from ultralytics_dp.losses.per_image import per_sample_losses

    params = trainable_params(model)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    norms, start = [], 0
    for size in sizes:
        loss = sum(per_sample_losses(model, image(batch, i))[0] for i in range(start, start + size)) / size
        start += size
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
        norms.append(norm)
        for k, g in zip(params, grads):
            total[k] += g * min(1.0, c / (norm + 1e-6))
    return total, norms


def _flat(d: dict) -> torch.Tensor:
    return torch.cat([d[k].flatten().double() for k in sorted(d)])


@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolo26n-cls.yaml"])
@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("sizes", [[2, 2, 2], [1, 3, 2]])
def test_a_record_of_several_images_is_clipped_once_on_the_mean_of_their_gradients(cfg, method, sizes):
    """Records of consecutive images (an image's 2 views, or persons with 1, 3 and 2 images): a
    record's gradient is the mean of its images', clipped once. Checked against a naive loop over
    records, with chunks that hold one or more whole records (a record larger than a chunk is a
    chunk alone); the person with one image is clipped exactly as image-level clipping clips it."""
    model = trainer_model(cfg)
    batch = _batch(cfg, sum(sizes))
    expected, norms = _naive_record_sum(model, batch, sizes, 0.05)
    assert max(norms) > 0.05  # clipping is exercised
    for physical_batch in (2, 4):
        grad = private_gradient(model, batch, method=method, max_grad_norm=0.05, noise_multiplier=0.0,
                                expected_batch_size=1.0, physical_batch=physical_batch, groups=Groups(tuple(sizes)))
        assert ((_flat(grad) - _flat(expected)).norm() / _flat(expected).norm()).item() <= 1e-5


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_removing_one_person_moves_the_clipped_sum_by_at_most_c_and_exactly_c_when_clipped(method):
    """Add/remove one person (all of their images): the noiseless sum moves by the person's clipped
    mean gradient, of norm <= C, and = C for a person whose mean gradient is longer than C (the
    case that reaches the bound). Without the person-level mean and one clip per person (each of
    the 3 images clipped to C) the move would be up to 3 C."""
    model = trainer_model("yolo26n.yaml")
    batch = _batch("yolo26n.yaml", 7)
    c = 0.02
    with_person = private_gradient(model, batch, method=method, max_grad_norm=c, noise_multiplier=0.0,
                                   expected_batch_size=1.0, groups=Groups((2, 3, 2)))
    rest = select(batch, [0, 1, 5, 6])
    without = private_gradient(model, rest, method=method, max_grad_norm=c, noise_multiplier=0.0,
                               expected_batch_size=1.0, groups=Groups((2, 2)))
    _, norms = _naive_record_sum(model, batch, [2, 3, 2], c)
    assert norms[1] > c  # the removed person's mean gradient is clipped
    moved = (_flat(with_person) - _flat(without)).norm().item()
    assert abs(moved - c) <= 1e-4 * c


def test_a_batch_of_partial_records_is_refused():
    model = trainer_model("yolo26n-cls.yaml")
    batch = {"img": torch.rand(3, 3, 32, 32), "cls": torch.tensor([1, 1, 2])}
    with pytest.raises(ValueError, match="whole records"):
        private_gradient(model, batch, method="ghost", max_grad_norm=1.0, noise_multiplier=0.0,
                         expected_batch_size=1.0, groups=Groups((2, 2)))


def test_a_step_on_a_batch_that_does_not_say_its_records_is_refused():
    """The loader says which images form each record; a batch from anywhere else fails closed."""
    from ultralytics_dp.integration.private_step import record_groups

    with pytest.raises(RuntimeError, match="Poisson loader"):
        record_groups({"img": torch.rand(2, 3, 8, 8)})
    with pytest.raises(RuntimeError, match="its records 3"):
        record_groups({"img": torch.rand(2, 3, 8, 8), RECORD_SIZES: [1, 2]})
    assert record_groups({"img": torch.rand(3, 3, 8, 8), RECORD_SIZES: [1, 2]}).sizes == (1, 2)


def test_select_keeps_each_images_masks():
    """Segmentation chunks: one mask per image (overlap_mask) or per instance, and the class map."""
    batch = {"img": torch.arange(3.0).view(3, 1, 1, 1), "batch_idx": torch.tensor([0.0, 2, 2]),
             "cls": torch.tensor([[1.0], [2], [3]]), "bboxes": torch.rand(3, 4),
             "masks": torch.arange(3.0).view(3, 1, 1), "sem_masks": torch.arange(3.0).view(3, 1, 1) + 10}
    chunk = select(batch, [2, 0])
    assert chunk["masks"].view(-1).tolist() == [2.0, 0.0] and chunk["sem_masks"].view(-1).tolist() == [12.0, 10.0]
    assert chunk["batch_idx"].tolist() == [1.0, 0.0, 0.0] and chunk["cls"].view(-1).tolist() == [1.0, 2.0, 3.0]
    per_instance = select(batch, [2], overlap_masks=False)  # instances 1 and 2 belong to image 2
    assert per_instance["masks"].view(-1).tolist() == [1.0, 2.0] and per_instance["batch_idx"].tolist() == [0.0, 0.0]


def test_the_torch_func_path_runs_under_the_trainers_autocast():
    """With amp=True the step runs under autocast; torch.func's per-sample forward then failed in
    eval-mode BatchNorm ('expected scalar type BFloat16 but found Float', found by a review). The
    path now runs in the parameters' precision: the same clipped sum as without autocast, which an
    independent computation (the naive per-image clip below) checks."""
    model = trainer_model("yolov8n.yaml")
    batch = det_batch([1, 2, 0])
    c = 0.01
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = private_gradient(model, batch, method="vmap", max_grad_norm=c, noise_multiplier=0.0,
                                expected_batch_size=1.0)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(3):
        loss = per_image_loss_fn(model)(model, sample_batch(model, image(batch, i)))
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values() if g is not None))
        for k, g in grads.items():
            if g is not None:
                expected[k] += g * min(1.0, c / (float(norm) + 1e-6))
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert ((flat(ours) - flat(expected)).norm() / flat(expected).norm()).item() <= 1e-5


@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolov8n.yaml"])
def test_the_private_step_reads_the_device_back_no_more_often_than_ultralytics_loss(cfg, monkeypatch):
    """On an accelerator each read of a tensor's value to the host (``.item()``, ``nonzero``, a
    tensor built from host data is the other direction) stalls the queue of launched kernels. The
    private step, run as on an accelerator (no finiteness check on the host), reads back only
    what its per-image losses read, and they no more often than Ultralytics' own batch loss on the
    same batch (what remains is inside Ultralytics: its target padding and its assigner)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ultralytics_dp.mechanism import ghost

    reads = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in reads
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(ghost, "_host_checks_finiteness", lambda device: False)
    model, batch = trainer_model(cfg), det_batch([1, 0, 3, 2])

    def step():
        return private_gradient(model, batch, method="ghost", max_grad_norm=1.0, noise_multiplier=1.0,
                                expected_batch_size=4.0)

    step()  # first use reads the model's strides once
    with Count() as ours:
        step()
    with Count() as losses:
        batch_losses(model, batch)
    with Count() as theirs:
        model.loss(batch)
    assert ours.n == losses.n  # the clipping, the sum and the noise read nothing back
    assert 0 < theirs.n and losses.n <= theirs.n
