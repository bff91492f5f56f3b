"""The precision sweep's pieces that run without a GPU: the gap it prints, and each setting switched on for its
own call only (the sweep itself needs a GPU)."""

from __future__ import annotations

import torch

from benchmarks.precision_sweep import logprob_gap, run_setting
from common_kernels.model import linear_math
from common_kernels.ops import triton_settings


def test_the_gap_is_the_max_and_mean_absolute_difference():
    assert logprob_gap(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])) == (0.5, 0.25)


def test_each_setting_is_on_during_its_call_and_restored_after():
    seen = []

    class Model:
        def token_logprobs(self, ids):
            seen.append((triton_settings.FP32_DOT_PRECISION, linear_math.LINEAR_ATTN_DTYPE))
            return ids.float()

    before = triton_settings.FP32_DOT_PRECISION, linear_math.LINEAR_ATTN_DTYPE
    for setting in ("ieee", "bf16-qkv"):
        run_setting(Model(), torch.zeros(2), setting)
    assert seen == [("ieee", before[1]), (before[0], torch.bfloat16)]
    assert before == (triton_settings.FP32_DOT_PRECISION, linear_math.LINEAR_ATTN_DTYPE)
