"""Where the randomness of DP-SGD comes from: noise and sampling never use torch's global RNG.

Privacy assumptions relied on here: Ultralytics seeds torch's global RNG with a public ``seed``,
and noise or batches reproducible from a public seed protect nothing. So every generator here is
seeded with 64 bits of OS entropy, and secure mode draws from the OS CSPRNG itself.
This module must not import Ultralytics.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

_generators: dict[torch.device, torch.Generator] = {}


def os_seeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded with 64 bits from ``os.urandom``."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return gen


def noise_generator(device: torch.device | str) -> torch.Generator:
    """The engine's own OS-seeded generator for ``device`` (created on first use)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _generators:
        _generators[device] = os_seeded_generator(device)
    return _generators[device]


def secure_uniform(n: int) -> Tensor:
    """``n`` float64 uniforms in (0, 1) from 53 random bits each of the OS CSPRNG."""
    words = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64) if n else torch.zeros(0, dtype=torch.int64)
    return (((words >> 11) & ((1 << 53) - 1)).to(torch.float64) + 0.5) / float(1 << 53)


def secure_normal(shape: torch.Size | tuple[int, ...], *, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """Standard normal draws from the OS CSPRNG (``os.urandom``), not from a seedable PRNG.

    Box-Muller (both outputs) on 53-bit uniforms in float64; each value is the sum of 4 independent draws scaled
    by 1/2, which blurs the low-order-bit patterns that floating-point attacks on Gaussian samplers
    exploit (Mironov 2012; Jin et al. 2022). That is a mitigation, not a proof: the result is still
    a floating-point approximation of a Gaussian.
    """
    n = math.prod(shape)
    u = secure_uniform(4 * n).view(2, 2, n)
    r, theta = torch.sqrt(-2.0 * torch.log(u[:, 0])), 2 * math.pi * u[:, 1]
    z = (r * torch.cos(theta)).sum(0) + (r * torch.sin(theta)).sum(0)  # 4 independent N(0, 1)
    return (z / 2).view(shape).to(device=device, dtype=dtype)
