"""Tools beside training: input-noise robustness of trained models (``robustness``, not DP)."""
