"""One private step across several processes (torch.distributed, as Ultralytics' DDP launcher runs it).

A multi-GPU run (``yolo train device=0,1,2,3``, or ``torchrun --nnodes ...``) is W processes
("ranks"), each holding a copy of the model. DP-SGD needs exactly one Poisson sample of the
whole training set and one Gaussian draw per step, whatever W is:

* **Sampling**: record i belongs to rank ``i mod W`` (``shard``); each rank includes each record
  of its shard independently with probability q = expected batch / N (global batch, global N).
  The shards are disjoint and cover the set, so the union of the ranks' batches is exactly a
  Poisson sample of the whole set at rate q: what the accountant assumes. Each rank's sampler is
  seeded from its own OS entropy, so inclusions are independent across ranks too.
* **One noise draw**: each rank sums the clipped per-image gradients of its own images; rank 0
  alone adds N(0, sigma^2 C^2) to its sum; one SUM all-reduce then gives every rank
  ``sum over all sampled images of clip(g_i) + one Gaussian draw`` per coordinate (an all-reduce
  hands every rank the same result), which is divided by q*N. Every rank steps on the identical
  gradient, so the ranks' models stay identical.
* **One accountant**: the plan (sigma, q, step budget) and each epoch's granted steps are decided on
  rank 0 (accountant, ledger) and broadcast (``from_main``) before any step of them: every rank
  takes the same steps, and the ledger's write-ahead reservation precedes the steps of every rank.

Privacy assumptions relied on here: the ranks are one trusted job (each reads raw training
images anyway); partial sums travel between ranks without noise, inside that job; what leaves it
(checkpoints, logs, metrics) is written by rank 0 from the noisy step only. Nothing assumes one
node. Cost: one all-reduce of the clipped sums (one value per trainable parameter) per step.
This module must not import Ultralytics.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .. import checks
from .gaussian import flatten, noisy_flat, unflatten

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process accounts, writes the ledger and checkpoints, and logs (rank 0); before
    the process group exists, from the launcher's ``RANK`` variable."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) <= 0


def shard(num_samples: int) -> range:
    """The records this rank samples from: every W-th, from its rank (disjoint, covering)."""
    rank, world = rank_and_world()
    return range(rank, num_samples, world)


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (every rank must call this at the same point)."""
    rank, world = rank_and_world()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value``, on every rank (so that all can refuse together)."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def digest(tensors: dict[str, Tensor], text: str) -> str:
    """SHA-256 of named tensors (bytes, dtype, shape) and a text: compares replicas across ranks."""
    h = hashlib.sha256(text.encode())
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def private_mean(
    local_sum: dict[str, Tensor], *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
    generator: torch.Generator | None = None, secure: bool = False,
) -> dict[str, Tensor]:
    """``(sum over the ranks of their clipped sums + one N(0, (sigma*C)^2) draw) / (q*N)`` on every rank.

    ``local_sum``: this rank's sum of clipped per-image gradients. The noise is drawn on rank 0 only
    (with ``generator`` or ``secure`` as in ``mechanism.noisy_flat``) and added before the all-reduce,
    so the job's total noise is exactly one draw. One flat all-reduce for all parameters."""
    checks.finite_positive("expected_batch_size", expected_batch_size)
    rank, _ = rank_and_world()
    flat = (noisy_flat(local_sum, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, generator=generator,
                       secure=secure) if rank == 0 else flatten(local_sum))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return unflatten(flat.div_(expected_batch_size), local_sum)


def unwrap(model: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` wrapper (the private step replaces DDP's
    gradient all-reduce with ``private_mean``'s), else ``model``."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
