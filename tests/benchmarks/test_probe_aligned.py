"""The aligned probe's helpers that run anywhere (the probe itself needs a GPU)."""

from __future__ import annotations

import torch

from benchmarks.probe_aligned import packed


def test_sequences_are_packed_with_their_offsets():
    ids, offsets = packed([[5, 6, 7], [], [9]], device="cpu")
    assert torch.equal(ids, torch.tensor([5, 6, 7, 9])) and offsets == [0, 3, 3, 4]
