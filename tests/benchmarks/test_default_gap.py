"""The default-mode gap report's arithmetic (the runs need a GPU): logprob gaps and expert-set mismatches."""

from __future__ import annotations

import torch

from benchmarks.default_gap import expert_mismatch, gap_stats


def test_gap_stats_count_every_differing_bit_and_the_largest_gap():
    stats = gap_stats(torch.tensor([-1.0, -2.0, -3.0, -0.5]), torch.tensor([-1.0, -2.5, -3.0, -0.5000001]))
    assert stats["tokens"] == 4 and stats["unequal"] == 2
    assert abs(stats["max"] - 0.5) < 1e-12 and stats["mean"] > 0.125


def test_an_expert_set_in_another_order_matches_and_one_other_expert_in_one_layer_does_not():
    engine = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]], [[1, 2], [3, 4]]])
    shim = torch.tensor([[[2, 1], [4, 3]], [[5, 6], [7, 9]], [[1, 2], [3, 4]]])
    assert abs(expert_mismatch(engine, shim) - 1 / 3) < 1e-6
