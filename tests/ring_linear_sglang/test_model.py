"""The model on SGLang's layers, built on the CPU: the layer schedule, and every checkpoint tensor loaded into
a parameter (and every parameter filled) through SGLang's own weight loaders; bad tensors named; the served dtype
and no autograd; and a one-token forward against the shim."""

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


def test_inference_parameters_and_the_served_dtype(sglang_world, tiny_dir):
    """SGLang captures decode graphs outside no_grad (its fused-MoE reduction refuses inputs that require grad), and
    it builds the model under the served dtype (`--dtype`), which may differ from the checkpoint's."""
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    from ring_linear_sglang.config import RingLinearSGLangConfig
    from ring_linear_sglang.model import RingLinearForCausalLM

    config = RingLinearSGLangConfig.from_pretrained(tiny_dir)
    assert config.checkpoint_dtype() == torch.float32
    with set_default_torch_dtype(torch.bfloat16):
        model = RingLinearForCausalLM(config=config)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.dtype == torch.bfloat16 and all(layer.dtype == torch.bfloat16 for layer in model.model.layers)


class _OneTokenSoftmax(torch.nn.Module):
    """Softmax attention over a one-token prompt: each head returns its KV group's v."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    def forward(self, q, k, v, forward_batch):
        v = v.reshape(v.shape[0], self.kv_heads, self.head_dim)
        return v.repeat_interleave(self.heads // self.kv_heads, dim=1).reshape(v.shape[0], -1)


class _OneTokenLinear(torch.nn.Module):
    """Linear attention over a one-token prompt from a zero state: `scale * (q . k) * v` per head."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim

    def forward(self, q, k, v, forward_batch):
        q, k, v = (t.reshape(t.shape[0], self.heads, self.head_dim).float() for t in (q, k, v))
        return ((q * k).sum(-1, keepdim=True) * self.head_dim**-0.5 * v).reshape(q.shape[0], -1)


def _as_on_gpu(run_experts, routed_scaling_factor: float):
    """SGLang's CPU expert call made to behave as its GPU runner: routed scaling applied, result written in place."""

    def forward(x, *args, **kwargs):
        return x.copy_(run_experts(x, *args, **kwargs) * routed_scaling_factor)

    return forward


def test_a_one_token_prompt_gives_the_shims_logprobs(sglang_world, tiny_dir):
    """Everything but the attention backends (embedding, norms, projections, qk-norm/RoPE, norm-gate, MLPs, MoE
    routing and experts, LM head) against the shim: attention over one token has a closed form, put in place of
    SGLang's attention calls. SGLang's CPU MoE path (`moe_forward_native`) leaves out `routed_scaling_factor`,
    which its GPU runner applies, and returns a new tensor where the GPU runner overwrites its input; both GPU
    behaviours are put back here (reading the input after the routed experts once gave wrong shared experts)."""
    from common_kernels import RingLinearForCausalLM as Shim
    from ring_linear_sglang.config import RingLinearSGLangConfig
    from ring_linear_sglang.model import RingLinearForCausalLM

    config = RingLinearSGLangConfig.from_pretrained(tiny_dir)
    model = RingLinearForCausalLM(config=config)  # its own: the attention calls are replaced below
    model.load_weights(_checkpoint(tiny_dir).items())
    c = config
    for l, layer in enumerate(model.model.layers):
        layer.attention.attn = (
            _OneTokenSoftmax(c.num_attention_heads, c.num_key_value_heads, c.head_dim)
            if c.is_softmax_layer(l)
            else _OneTokenLinear(c.num_attention_heads, c.head_dim)
        )
        if c.is_moe_layer(l):
            layer.mlp.experts.forward = _as_on_gpu(layer.mlp.experts.forward, c.routed_scaling_factor)
    shim = Shim.from_pretrained(tiny_dir, use_triton=False)
    for token in (1, 5, 17, c.vocab_size - 1):
        ids = torch.tensor([token])
        with torch.no_grad():
            hidden = model.model(ids, torch.tensor([0]), None)
            got = torch.log_softmax(hidden.float() @ model.lm_head.weight.float().T, -1)[0]
            want = torch.log_softmax(shim(ids[None]).float()[0, -1], -1)
        assert (got - want).abs().max() < 1e-5, f"token {token}: max {(got - want).abs().max():.2e}"


def test_the_rope_frequencies_are_held_on_the_device_the_model_is_built_on(sglang_world, tiny_dir):
    """SGLang builds the model under its GPU's device context (the meta device stands in here) and never moves it:
    the frequencies, computed on the CPU as the shim computes them, must be held there, or every step (and CUDA
    graph capture) would copy them from the host."""
    from ring_linear_sglang.config import RingLinearSGLangConfig
    from ring_linear_sglang.model import RingLinearForCausalLM

    config = RingLinearSGLangConfig.from_pretrained(tiny_dir)
    with torch.device("meta"):
        model = RingLinearForCausalLM(config=config)
    assert model.model.inv_freq.device.type == "meta"
