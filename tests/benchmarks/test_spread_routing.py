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


def dummy_router_inputs(tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A Ring-mini router's dummy weight and RMS-normed tokens times the dummy norm weight, as the engines see them."""
    D, E = 2048, 256
    h = torch.randn(tokens, D, generator=torch.Generator().manual_seed(0))
    x = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * dummy_fill(D)).bfloat16()
    return x, dummy_fill((E, D))


def test_scaled_routers_give_unit_logits_whose_scores_16_bit_rounding_cannot_tie():
    from benchmarks.server_hooks.spread_routing import unit_logit_scale

    x, weight = dummy_router_inputs()
    dummy = x.float() @ weight.T
    scaled = x.float() @ (weight * unit_logit_scale(weight)).T
    assert dummy.std() < 1e-4 and 0.5 < scaled.std() < 2.0
    # a kernel that keeps its scores in bf16: the dummy scores all round to 0.5, the scaled ones stay apart
    distinct = lambda logits: torch.sigmoid(logits).bfloat16().unique(dim=1).shape[1]  # noqa: E731
    assert distinct(dummy) <= 2 and distinct(scaled) > 100
    ids, _ = route(x, weight * unit_logit_scale(weight), torch.zeros(256), 8, 8, 4, 2.5, True)
    assert int((torch.bincount(ids.flatten(), minlength=256) > 0).sum()) >= 240


def _stand_in_model() -> torch.nn.Module:
    """Our router (weight and `expert_bias` buffer), the twin's (an `nn.Linear` given an `expert_bias` parameter) and an
    MLP projection the scaling must leave alone."""
    model = torch.nn.Module()
    model.gate = torch.nn.Linear(64, 8, bias=False)
    model.gate.register_buffer("expert_bias", torch.zeros(8))
    model.twin = torch.nn.Module()
    model.twin.gate = torch.nn.Linear(64, 8, bias=False)
    model.twin.gate.expert_bias = torch.nn.Parameter(torch.zeros(8))
    model.gate_proj = torch.nn.Linear(64, 8, bias=False)
    return model


def _dummy_fill(tensor, low=-1e-3, high=1e-3, seed=1234, name=""):
    tensor.data.uniform_(low, high, generator=torch.Generator().manual_seed(seed))


def _scaled_once(model: torch.nn.Module) -> bool:
    """The routers hold the fill scaled once, the projection the fill, the biases zero."""
    from benchmarks.server_hooks.spread_routing import unit_logit_scale

    filled = torch.empty(8, 64)
    _dummy_fill(filled)
    routers = (model.gate, model.twin.gate)
    return all(
        torch.allclose(r.weight, filled * unit_logit_scale(filled)) and not r.expert_bias.any() for r in routers
    ) and torch.equal(model.gate_proj.weight, filled)


def test_the_scaled_hook_scales_each_router_once_under_both_of_vllms_fills():
    """vLLM 0.26 refills every module's whole state dict, module after module; vLLM 0.33 fills each module's own
    tensors by their local names, so the routers are scaled after the whole load."""
    import types

    from benchmarks.server_hooks import spread_routing

    def fill_module(model, model_config=None):
        for tensor in model.state_dict().values():
            loader.initialize_single_dummy_weight(tensor)

    class WholeFillLoader:  # vLLM 0.26
        def load_weights(self, model, model_config):
            for layer in model.modules():
                loader.initialize_dummy_weights(layer, model_config)

    loader = types.SimpleNamespace(
        initialize_dummy_weights=fill_module,
        initialize_single_dummy_weight=_dummy_fill,
        DummyModelLoader=WholeFillLoader,
    )
    spread_routing.patch(loader, scaled=True)
    model = _stand_in_model()
    loader.DummyModelLoader().load_weights(model, None)
    assert _scaled_once(model)

    class LocalFillLoader:  # vLLM 0.33
        def load_weights(self, model, model_config):
            for layer in model.modules():
                for name, tensor in [*layer._parameters.items(), *layer._buffers.items()]:
                    if tensor is not None:  # vLLM's get_layer_tensors skips a module's absent bias
                        single.initialize_single_dummy_weight(tensor, name=name)

    single = types.SimpleNamespace(initialize_single_dummy_weight=_dummy_fill, DummyModelLoader=LocalFillLoader)
    spread_routing.patch(single, scaled=True)
    model = _stand_in_model()
    single.DummyModelLoader().load_weights(model, None)
    assert _scaled_once(model)


def test_scaled_routing_names_its_runs_and_asks_the_hook_for_scaling():
    assert bench_serve.variant(routing="scaled") == "-scaled-routing"
    assert bench_serve.routing_env({}, "scaled")["RING_LINEAR_SPREAD_ROUTING"] == "scaled"
    assert bench_serve.parser().parse_args(["run", "--model", "ring-linear", "--routing", "scaled"]).routing == "scaled"
