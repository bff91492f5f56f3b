"""The decode profile's arithmetic (the profiles themselves need a GPU): per-step kernel time is the difference of
a long and a short generation divided by the extra steps, so the shared prefill cancels."""

from __future__ import annotations

from benchmarks.profile_vllm_prefill import per_step_table


def test_the_prefill_cancels_and_each_kernel_gets_its_time_per_step():
    short = {"prefill_kernel": 5000.0, "decode_kernel": 10.0, "moe": 300.0}
    long = {"prefill_kernel": 5000.0, "decode_kernel": 330.0, "moe": 940.0}
    table = per_step_table(short, long, steps=32, rows=10)
    assert "| moe | 20.0 | 66.7% |" in table and "| decode_kernel | 10.0 | 33.3% |" in table
    assert "| prefill_kernel | 0.0 | 0.0% |" in table and "| all kernels | 30.0 | |" in table
