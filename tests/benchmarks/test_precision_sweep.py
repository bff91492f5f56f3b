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


def test_the_bf16_setting_reaches_an_fp32_model(monkeypatch):
    """The bf16 probe rounds the fp32 model's q/k/v: a policy narrower than the activations holds (only a float64
    run raises the dtype)."""
    heads, d = 2, 16
    qkv = torch.randn(3, 3 * heads * d, dtype=torch.float32)
    cos, sin = torch.ones(3, d // 2), torch.zeros(3, d // 2)
    monkeypatch.setattr(linear_math, "LINEAR_ATTN_DTYPE", torch.bfloat16)
    q, k, v = linear_math.prepare_qkv(qkv, heads, None, None, cos, sin, 1e-6, use_triton=False)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    q64, _, _ = linear_math.prepare_qkv(qkv.double(), heads, None, None, cos, sin, 1e-6, use_triton=False)
    assert q64.dtype == torch.float64
