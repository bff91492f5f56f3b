"""The model on vLLM's layers: construction, the checkpoint-name mapping, the declared hybrid state."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("vllm")

from common_kernels import CheckpointError, expected_tensor_shapes, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def built(vllm_tools, tiny_dir):
    cfg = vllm_tools.engine_config(tiny_dir)
    return cfg, vllm_tools.build_model(cfg)


def _checkpoint(tiny_dir) -> dict[str, torch.Tensor]:
    return load_file(tiny_dir / "model.safetensors")


def test_every_checkpoint_tensor_maps_to_a_parameter_and_every_parameter_is_loaded(vllm_tools, built, tiny_dir):
    cfg, model = built
    weights = _checkpoint(tiny_dir)
    assert set(weights) == set(expected_tensor_shapes(tiny_config()))
    with vllm_tools.single_rank(cfg):
        loaded = model.load_weights(weights.items())
    assert loaded == {name for name, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    for name in ("model.word_embeddings.weight", "model.layers.0.attention.g_norm.weight", "lm_head.weight"):
        assert torch.equal(params[name], weights[name].to(device)), name
    layer0, layer2 = "model.layers.0.", "model.layers.2."  # linear (dense MLP), softmax (MoE)
    qkv = layer0 + "attention.query_key_value.weight"
    assert torch.equal(params[qkv], weights[qkv].to(device))
    gate_up = torch.cat([weights[layer0 + f"mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(params[layer0 + "mlp.gate_up_proj.weight"], gate_up.to(device))
    experts = [n for n in params if n.startswith(layer2 + "mlp.experts.") and n.endswith("w13_weight")]
    assert len(experts) == 1, experts
    w13 = params[experts[0]]
    for e in (0, 5):
        want = torch.cat([weights[f"{layer2}mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up")])
        assert torch.equal(w13[e], want.to(device)), f"expert {e}"
    bias = params[layer2 + "mlp.gate.expert_bias"]
    assert bias.dtype == torch.float32 and torch.equal(bias, weights[layer2 + "mlp.gate.expert_bias"].to(device))


def test_unexpected_and_misshapen_tensors_are_errors_naming_them(vllm_tools, built):
    cfg, model = built
    with vllm_tools.single_rank(cfg), pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.9.mlp"):
        model.load_weights([("model.layers.9.mlp.gate.weight", torch.zeros(8, 64))])
    with vllm_tools.single_rank(cfg), pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \(32,\)"):
        model.load_weights([("model.norm.weight", torch.zeros(32))])
    with vllm_tools.single_rank(cfg):  # derived tables some exporters write are skipped, not errors
        assert model.load_weights([("model.layers.0.attention.slope", torch.zeros(4))]) == set()


def test_declared_state_matches_each_linear_layer(built):
    cfg, model = built
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    from ring_linear_vllm.engine_config import states_per_entry

    config = tiny_config()
    stack = states_per_entry(cfg)  # 2 with caching off (`test_stacked_states.py`): a spec for the entry's first layer
    shape = model.get_mamba_state_shape_from_config(cfg)
    dtype = model.get_mamba_state_dtype_from_config(cfg)
    assert shape == ((stack, 4, 16, 16),) and stack == 2 and dtype == (torch.float32,)
    for layer_idx, layer in enumerate(model.model.layers):
        if config.is_softmax_layer(layer_idx):
            assert isinstance(layer.attention.attn.get_kv_cache_spec(cfg), FullAttentionSpec)
            continue
        spec = layer.attention.get_kv_cache_spec(cfg)
        if layer.attention.entry_row:
            assert spec is None, layer_idx
            continue
        assert isinstance(spec, MambaSpec), layer_idx
        assert spec.shapes == shape and spec.dtypes == dtype
        assert layer.attention.get_attn_backend().get_name() == "RING_LINEAR_ATTN"
    rates = [layer.attention.decay_rate for layer in model.model.layers if hasattr(layer.attention, "decay_rate")]
    assert all(r.dtype == torch.float32 and r.shape == (4,) for r in rates)
    weight_device = model.model.word_embeddings.weight.device
    buffers = [(name, b.device) for name, b in model.named_buffers()]
    assert all(d == weight_device for _, d in buffers), buffers  # no per-step host-to-device copies
    assert len({tuple(r.tolist()) for r in rates}) == len(config.linear_layer_ids)  # one decay schedule per layer


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-stage CPU (gloo) run")
def test_pipeline_parallel_2_stages_split_the_layers_and_load_only_their_own(vllm_tools, tiny_dir, tmp_path):
    import json

    stages = [json.loads(path.read_text()) for path in vllm_tools.run_two_ranks("pp", tiny_dir, tmp_path)]
    assert stages[0]["layers"][0] == 0 and stages[0]["layers"][1] == stages[1]["layers"][0]
    assert stages[1]["layers"][1] == tiny_config().num_hidden_layers
    for stage in stages:
        assert stage["loaded"] == stage["params"]  # the other stage's tensors are skipped, not errors
    first, last = (set(s["params"]) for s in stages)
    assert "model.word_embeddings.weight" in first and "lm_head.weight" in last and "model.norm.weight" in last
    assert not any(name.startswith("model.layers.5.") for name in first)
    assert not any(name.startswith("model.layers.0.") for name in last)


def test_the_mha_equivalent_checkpoint_computes_the_same_logprobs(vllm_tools, tiny_dir, tmp_path):
    """The TP 2 GPU test serves this copy (KV heads repeated per query head): it must be the same model."""
    from common_kernels import RingLinearForCausalLM

    mha = vllm_tools.write_mha_equivalent(tiny_dir, tmp_path / "mha")
    original = RingLinearForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    repeated = RingLinearForCausalLM.from_pretrained(mha, dtype=torch.float64)
    assert (original.config.num_key_value_heads, repeated.config.num_key_value_heads) == (2, 4)
    ids = torch.randint(3, tiny_config().vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original.token_logprobs(ids), repeated.token_logprobs(ids)
    assert want.abs().mean() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
