"""The vLLM layer-diff tool's CPU half: the shim's dump in aligned mode, and the engine-side hooks that keep each
module's output per forward (a tuple's first tensor)."""

from __future__ import annotations

import torch

from benchmarks import layer_diff, vllm_layer_diff


def test_the_aligned_shim_dump_runs_the_aligned_path():
    from common_kernels import RingLinearForCausalLM, tiny_config

    model = RingLinearForCausalLM(tiny_config(), dtype=torch.float32, use_triton=True)
    model.init_weights(generator=torch.Generator().manual_seed(1))
    prompt = [3, 5, 7, 11, 2, 9]
    default = layer_diff.shim_outputs(model, prompt, device="cpu")
    aligned = layer_diff.shim_outputs(model, prompt, device="cpu", aligned=True)
    assert set(aligned) >= {"model.layers.0", "model.layers.0.mlp", "model.norm"}
    rows = layer_diff.compare(aligned, default)
    assert rows and any(diff > 0 for _, diff, _ in rows)  # other kernels, other bits
    assert all(diff < 1e-3 * max(scale, 1.0) for _, diff, scale in rows)  # the same function


def test_the_engine_hooks_keep_each_modules_output_per_forward():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x * 2, None

    model = torch.nn.Sequential(torch.nn.Identity(), Pair())
    vllm_layer_diff.ENGINE_OUTPUTS.clear()
    assert vllm_layer_diff.record_forwards(model) == 3
    model(torch.ones(2))
    model(torch.zeros(2))
    outputs = vllm_layer_diff.ENGINE_OUTPUTS
    assert torch.equal(outputs["1"][0], torch.full((2,), 2.0)) and torch.equal(outputs["0"][0], torch.ones(2))
    assert torch.equal(outputs[""][0], torch.full((2,), 2.0))  # the model's own output: the tuple's first tensor
    assert all(len(kept) == 2 for kept in outputs.values()) and torch.equal(outputs["1"][1], torch.zeros(2))


def test_internals_keep_each_steps_first_call_and_put_the_functions_back():
    from common_kernels import RingLinearForCausalLM, tiny_config
    from common_kernels.model import layers

    model = RingLinearForCausalLM(tiny_config(), dtype=torch.float32, use_triton=True)
    model.init_weights(generator=torch.Generator().manual_seed(1))
    original = layers.prepare_qkv
    with layer_diff.record_internals(vllm_layer_diff.SHIM_STEPS) as steps:
        layer_diff.shim_outputs(model, [3, 5, 7, 11], device="cpu", aligned=True)
    assert layers.prepare_qkv is original
    q, o = steps["step:prepare_qkv.out0"], steps["step:attention.out0"]
    H, d = model.config.num_attention_heads, model.config.head_dim
    assert q.shape == o.shape == (4, H, d)
    assert steps["step:gate_output.in0"].reshape(4, H, d).equal(o)  # the attention output is the gate's input
    with layer_diff.record_internals(vllm_layer_diff.SHIM_STEPS, enabled=False) as nothing:
        layer_diff.shim_outputs(model, [3, 5], device="cpu", aligned=True)
    assert nothing == {}
