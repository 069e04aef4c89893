"""The DP-SGD mechanism, in torch alone: per-sample gradients (``grad_sample``, ``ghost``), clipping,
the Gaussian noise (``gaussian``) and its randomness (``randomness``), Poisson sampling
(``sampling``) and the sum across processes (``distributed``). Never imports Ultralytics, the
losses, the accountant or the trainer glue (``tests/test_layers.py``).
"""
