"""Gradient-space canaries: crafted records whose gradient is a Dirac on one coordinate (the
white-box canaries of Steinke, Nasr and Jagielski 2023 and of Nasr et al. 2023).

Canary i is a record whose gradient is ``norm * e_j(i)``: one coordinate j(i) of the model's largest
trainable tensor, a different coordinate for each canary. Each canary is included in the run with
probability 1/2 (``included``, drawn once from OS entropy); at every private step each included
canary is Poisson-sampled at the run's rate q like any record, and the sampled canaries' gradients
are clipped by the mechanism's own ``clip_factors`` and added to the step's clipped sum before the
one noise draw (``private_step``). The score of a canary is the log likelihood ratio of "in" against
"out" over the private gradients' coordinate j(i) at every step (``observe``): what an auditor who
sees every noisy gradient (the released mechanism's output) would compute. Included canaries push
their coordinate up by C each time they are sampled; the noise sigma*C hides that exactly as much
as the accountant says.

The scores read nothing but the released noisy gradients and the canaries' own draws, so an
audit's result is post-processing of the run: on private data it is covered by the run's guarantee.
(Taking the real records' share of each coordinate off, as an adversary who knows them could, made
no measurable difference and would make the result a function of unnoised private data.) It audits
the noise, the canaries' clipping and sampling, and the accountant; the real records' clipping is
checked before every run by ``integration.self_check``.

Privacy assumptions relied on here: the canaries are extra records with the run's q and the clipping
bound C, so each is protected by the run's (epsilon, delta), and they change nothing for the real
records (another record's gradient is bounded by C whatever the canaries add). Sampling and
inclusion use OS-seeded generators, never torch's global RNG (which Ultralytics seeds publicly).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import checks
from ..mechanism import gaussian
from ..mechanism.randomness import os_seeded_generator


class GradientCanaries:
    """``count`` Dirac canaries of gradient norm ``norm`` (before clipping); ``add_to`` puts a step's
    sampled canaries into the clipped sum (the step passes its own q and C), ``observe`` reads the
    private gradient back, ``scores()`` and ``included`` are the audit's."""

    def __init__(self, count: int, *, norm: float) -> None:
        if count < 2:
            raise ValueError(f"canaries must be >= 2, got {count}")
        checks.finite_positive("canary norm", norm)
        self.count, self.norm = count, norm
        self._gen = os_seeded_generator()
        self.included = torch.rand(count, generator=self._gen) < 0.5
        self.steps = 0
        self._where: tuple[str, Tensor] | None = None  # (tensor name, flat coordinates)
        self._scores: Tensor | None = None
        self._clipped = 0.0  # a canary's clipped norm at the last step

    def _coordinates(self, tensors: dict[str, Tensor]) -> tuple[str, Tensor]:
        if self._where is None:
            name = max(tensors, key=lambda k: tensors[k].numel())
            numel = tensors[name].numel()
            if numel < self.count:
                raise ValueError(f"{self.count} canaries need as many coordinates; the largest trainable tensor "
                                 f"{name} has {numel}: use canaries<={numel}")
            self._where = (name, torch.randperm(numel, generator=self._gen)[: self.count])
        return self._where

    def add_to(self, total: dict[str, Tensor], *, sample_rate: float, max_grad_norm: float) -> None:
        """Add this step's sampled canaries (each included one with probability ``sample_rate``),
        each clipped to ``max_grad_norm`` like any record, to ``total`` (in place)."""
        name, coords = self._coordinates(total)
        sampled = self.included & (torch.rand(self.count, generator=self._gen) < sample_rate)
        norms = torch.full((self.count,), self.norm, dtype=torch.float64)
        clipped = gaussian.clip_factors(norms, max_grad_norm) * self.norm
        self._clipped = float(clipped[0])  # every canary has the same norm, so the same clipped norm
        values = torch.where(sampled, clipped, 0.0)
        target = total[name]
        dirac = torch.zeros(target.numel(), dtype=target.dtype)
        dirac[coords] = values.to(target.dtype)
        target.add_(dirac.to(target.device).view(target.shape))
        self.steps += 1

    def observe(self, grad: dict[str, Tensor], *, sample_rate: float, divisor: float, noise_std: float) -> None:
        """Score this step's private gradient (the noisy sum divided by ``divisor``, its noise
        N(0, noise_std^2) before the division) at every canary's coordinate, on its device (no sync).

        In the sum, a canary's coordinate holds its clipped norm c with probability q if it is in,
        plus the noise, plus the real records' small share. The score adds the log likelihood ratio
        of "in" against "out" of that observation, log(1 - q + q exp(mu z - mu^2 / 2)) with
        z = x / noise_std and mu = c / noise_std: the most powerful test of one step
        (Neyman-Pearson), where a plain sum would let the steps that did not sample the canary
        drown those that did."""
        checks.finite_positive("noise_std", noise_std)
        name, coords = self._coordinates(grad)
        flat = grad[name].reshape(-1)
        z = flat[coords.to(flat.device)].double() * (divisor / noise_std)
        mu = self._clipped / noise_std
        log_in = z * mu - mu * mu / 2 + math.log(sample_rate)
        log_out = math.log1p(-sample_rate) if sample_rate < 1 else -math.inf
        ratio = torch.logaddexp(log_in, torch.full_like(z, log_out))
        self._scores = ratio if self._scores is None else self._scores.add_(ratio)

    def scores(self) -> list[float]:
        """Each canary's score: the log likelihood ratio of "in" over every step observed so far."""
        if self._scores is None:
            raise RuntimeError("no private step has been observed: the run took no step")
        return self._scores.cpu().tolist()
