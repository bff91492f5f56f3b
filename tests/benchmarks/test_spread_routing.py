"""`server_hooks/spread_routing.py`: why vLLM's dummy weights need it (their routing) and how `bench_serve` turns it
on (the hook itself, on vLLM's own dummy loader: `tests/ring_linear_vllm/test_spread_routing_hook.py`)."""

import os
from pathlib import Path

import pytest
import torch

from benchmarks import bench_serve
from common_kernels.ops.moe.naive import route

HOOKS = Path(bench_serve.__file__).parent / "server_hooks"


def dummy_fill(shape, seed=1234):
    """vLLM's dummy fill: uniform in [-1e-3, 1e-3], the generator seeded alike for every tensor."""
    return torch.empty(shape).uniform_(-1e-3, 1e-3, generator=torch.Generator().manual_seed(seed))


def experts_reached(bias: torch.Tensor, tokens: int = 4096) -> int:
    """Distinct experts a Ring-mini router with dummy weights sends `tokens` RMS-normed tokens to."""
    D, E = 2048, 256
    h = torch.randn(tokens, D, generator=torch.Generator().manual_seed(0))
    x = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * dummy_fill(D)).bfloat16()
    ids, _ = route(x, dummy_fill((E, D)), bias, 8, 8, 4, 2.5, True)
    return int((torch.bincount(ids.flatten(), minlength=E) > 0).sum())


def test_the_dummy_bias_sends_every_token_to_the_same_experts_and_zero_spreads_them():
    assert experts_reached(dummy_fill(256)) <= 12
    assert experts_reached(torch.zeros(256)) >= 240


def test_spread_routing_names_its_runs_and_refuses_sglang():
    assert bench_serve.variant(routing="spread") == "" and bench_serve.variant(routing="dummy") == "-dummy-routing"
    env = bench_serve.routing_env({"PYTHONPATH": "/x"}, "spread", "vllm")
    assert env["RING_LINEAR_SPREAD_ROUTING"] == "1" and env["PYTHONPATH"] == f"{HOOKS}{os.pathsep}/x"
    assert bench_serve.routing_env({}, "dummy", "sglang") == {}
    with pytest.raises(SystemExit, match="--routing dummy"):
        bench_serve.routing_env({}, "spread", "sglang")
