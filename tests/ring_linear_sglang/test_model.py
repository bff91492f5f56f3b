"""The model on SGLang's layers, built on the CPU: the layer schedule, and every checkpoint tensor loaded into
a parameter (and every parameter filled) through SGLang's own weight loaders; bad tensors named."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

from safetensors.torch import load_file  # noqa: E402

from common_kernels import CheckpointError, expected_tensor_shapes, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def built(sglang_world, tiny_dir):
    from ring_linear_sglang.config import RingLinearSGLangConfig
    from ring_linear_sglang.model import RingLinearAttention, RingLinearForCausalLM, RingSoftmaxAttention

    config = RingLinearSGLangConfig.from_pretrained(tiny_dir)
    model = RingLinearForCausalLM(config=config)
    kinds = [type(layer.attention) for layer in model.model.layers]
    assert kinds == [
        RingSoftmaxAttention if config.is_softmax_layer(l) else RingLinearAttention for l in range(len(kinds))
    ]
    return config, model


def _checkpoint(tiny_dir) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(tiny_dir.glob("*.safetensors")):
        weights |= load_file(path)
    return weights


def test_every_checkpoint_tensor_fills_a_parameter_and_every_parameter_is_filled(built, tiny_dir):
    config, model = built
    weights = _checkpoint(tiny_dir)
    assert set(weights) == set(expected_tensor_shapes(tiny_config()))
    loaded = model.load_weights(weights.items())
    assert loaded == {name for name, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    for name in ("model.word_embeddings.weight", "model.layers.0.attention.g_norm.weight", "lm_head.weight"):
        assert torch.equal(params[name], weights[name].to(params[name].dtype)), name
    gate_up = torch.cat([weights[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(params["model.layers.0.mlp.gate_up_proj.weight"], gate_up.to(torch.get_default_dtype()))
    moe = next(l for l in range(config.num_hidden_layers) if config.is_moe_layer(l))
    bias = weights[f"model.layers.{moe}.mlp.gate.expert_bias"]
    assert params[f"model.layers.{moe}.mlp.gate.expert_bias"].dtype == torch.float32
    assert torch.equal(params[f"model.layers.{moe}.mlp.gate.expert_bias"], bias.float())
    assert params["lm_head.weight"].dtype == torch.float32  # fp32 LM head


def test_a_misshapen_or_unknown_tensor_is_named(built):
    _, model = built
    with pytest.raises(CheckpointError, match="'model.norm.weight' has shape \\(3,\\)"):
        model.load_weights([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.99.mlp.gate.weight'"):
        model.load_weights([("model.layers.99.mlp.gate.weight", torch.zeros(3))])
