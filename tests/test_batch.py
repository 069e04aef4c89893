"""Slicing a collated batch into a chunk: the whole batch is the batch itself (no index, no copy)."""

from __future__ import annotations

import torch

from ultralytics_dp.losses.batch import select

from helpers import det_batch


def test_the_whole_batch_as_one_chunk_is_the_batch_without_a_copy():
    """One chunk holding every image (the usual case on a GPU) slices nothing: the same tensors, no
    index built on the host, no boolean mask; a proper subset is re-indexed as before."""
    batch = {**det_batch([2, 0, 1]), "im_file": ["a", "b", "c"], "dp_record_sizes": [1, 1, 1]}
    whole = select(batch, [0, 1, 2])
    assert set(whole) == {"img", "batch_idx", "cls", "bboxes"}
    assert all(whole[k] is batch[k] for k in whole)
    part = select(batch, [2, 0])
    assert torch.equal(part["img"], batch["img"][[2, 0]]) and part["batch_idx"].tolist() == [1.0, 1.0, 0.0]
    assert torch.equal(select(batch, [2, 1, 0])["img"], batch["img"][[2, 1, 0]])  # an order is a slice
