"""The DP-SGD engine: per-sample gradients, clipping and noise (public API re-exported here).

See ``grad_sample`` (per-sample gradients with torch.func) and ``mechanism`` (clip, sum, noise).
Must not import Ultralytics.
"""

from .grad_sample import check_no_train_batchnorm, per_sample_grads
from .mechanism import add_noise, clipped_grad_sum, noise_generator, private_mean
from .sampling import PoissonBatchSampler, split_physical

__all__ = [
    "PoissonBatchSampler",
    "add_noise",
    "check_no_train_batchnorm",
    "clipped_grad_sum",
    "noise_generator",
    "per_sample_grads",
    "private_mean",
    "split_physical",
]
