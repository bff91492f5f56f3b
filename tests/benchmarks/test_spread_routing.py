"""`server_hooks/spread_routing.py`: why vLLM's dummy weights need it (their routing) and how `bench_serve` turns it
on (the hook itself, on vLLM's own dummy loader: `tests/ring_linear_vllm/test_spread_routing_hook.py`)."""

import os
from pathlib import Path

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


def test_spread_routing_names_its_runs_and_is_the_default_on_both_engines():
    assert bench_serve.variant(routing="spread") == "" and bench_serve.variant(routing="dummy") == "-dummy-routing"
    env = bench_serve.routing_env({"PYTHONPATH": "/x"}, "spread")
    assert env["RING_LINEAR_SPREAD_ROUTING"] == "1" and env["PYTHONPATH"] == f"{HOOKS}{os.pathsep}/x"
    assert bench_serve.routing_env({}, "dummy") == {}
    for engine in ("vllm", "sglang"):
        args = bench_serve.parser().parse_args(["run", "--model", "ring-linear", "--engine", engine])
        assert args.routing == "spread"


def test_the_hook_patches_both_fill_functions_vllm_has_had():
    """vLLM 0.26 fills a module's state dict at a time, 0.33 one named tensor at a time: both leave the selection bias
    at zero and every other tensor filled (a stand-in module; vLLM's own loader: the vLLM venvs' hook test)."""
    import types

    from benchmarks.server_hooks import spread_routing

    def fill(tensor, low=-1e-3, high=1e-3, seed=1234, name=""):
        tensor.uniform_(low, high, generator=torch.Generator().manual_seed(seed))

    def fill_module(model, model_config=None):
        for tensor in model.state_dict().values():
            fill(tensor)

    loader = types.SimpleNamespace(initialize_dummy_weights=fill_module, initialize_single_dummy_weight=fill)
    spread_routing.patch(loader)
    gate = torch.nn.Linear(4, 8)
    gate.register_buffer("expert_bias", torch.zeros(8))
    loader.initialize_dummy_weights(gate, None)
    assert not gate.expert_bias.any() and gate.weight.abs().max() > 0
    bias, weight = torch.zeros(8), torch.zeros(8)
    loader.initialize_single_dummy_weight(bias, name="expert_bias")
    loader.initialize_single_dummy_weight(weight, name="weight")
    assert not bias.any() and weight.abs().max() > 0
