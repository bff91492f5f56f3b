"""The vLLM linear-attention layer against the training shim's, on the Triton kernels (interpreted on CPU).

A mixed step (a continuing decode, a one-token prompt, a new prompt, the second chunk of a chunked
prefill, every slot holding stale memory) must give, token for token, what the shim computes over the
whole sequences; with tensor parallelism 2 each rank holds half the heads and norm groups.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), f"max abs error {err} (output scale {want.abs().max().item()})"


@pytest.fixture(params=["1", "0"], ids=["stacked", "one_state_an_entry"])
def cache_layout(request, monkeypatch):
    """Both cache layouts (`ring_linear_vllm.engine_config.states_per_entry`; these engines cache nothing, so the
    plugin alone would stack)."""
    monkeypatch.setenv("RING_LINEAR_STACKED_STATES", request.param)


@pytest.mark.usefixtures("cache_layout")
def test_mixed_prefill_decode_step_matches_the_shim(vllm_tools, tiny_dir):
    _assert_close(vllm_tools.mixed_step_output(tiny_dir), vllm_tools.mixed_step_reference(tiny_dir))


@pytest.mark.usefixtures("cache_layout")
def test_the_linear_layers_of_a_step_share_its_metadata(vllm_tools, tiny_dir):
    """Layers 0 and 1 (decays of their own) run on one metadata object and one RoPE table."""
    layers = (0, 1)
    _assert_close(vllm_tools.mixed_step_output(tiny_dir, layers), vllm_tools.mixed_step_reference(tiny_dir, layers))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-rank CPU (gloo) run; GPUs run TP through vLLM itself")
def test_tensor_parallel_2_matches_the_shim(vllm_tools, tiny_dir, tmp_path):
    outputs = [torch.load(path) for path in vllm_tools.run_two_ranks("tp", tiny_dir, tmp_path)]
    assert torch.equal(outputs[0], outputs[1])  # the row-parallel dense all-reduces
    _assert_close(outputs[0], vllm_tools.mixed_step_reference(tiny_dir))


def _unsplit_forward(layer, hidden, cos, sin):
    """The layer as it ran before the split, all inside one eager op: q/k/v cast to fp32 first, q and k
    normed and rotated one at a time, the gated norm written in fp32 and then cast for `dense`."""
    from common_kernels.ops.norm.fused import group_rms_norm_gate_triton
    from common_kernels.ops.rope.fused import qk_norm_rope_triton
    from common_kernels.precision import LINEAR_ATTN_DTYPE

    T, Hl, d = hidden.shape[0], layer.num_local_heads, layer.head_dim
    qkv, _ = layer.query_key_value(hidden)
    q, k, v = qkv.to(LINEAR_ATTN_DTYPE).view(T, 3 * Hl, d).split(Hl, dim=1)
    q, k = qk_norm_rope_triton(
        q, k, layer.query_layernorm.weight, layer.key_layernorm.weight, cos, sin, layer.config.rms_norm_eps
    )
    o = torch.empty_like(v)
    layer.attend(q, k, v, o)
    gate, _ = layer.g_proj(hidden)
    y = group_rms_norm_gate_triton(
        o.reshape(T, -1), gate, layer.g_norm.weight, layer.num_local_groups, layer.config.rms_norm_eps
    )
    out, _ = layer.dense(y.to(hidden.dtype))
    return out


def test_the_split_layer_equals_the_unsplit_one_bit_for_bit(vllm_tools, tiny_dir):
    """Projections and fused ops in the compiled region, the fp32 casts folded into the kernels: the same
    numbers as the one-op layer (fp32 model: every rounding is the same)."""
    split = vllm_tools.mixed_step_output(tiny_dir)
    unsplit = vllm_tools.mixed_step_output(tiny_dir, layer_forward=_unsplit_forward)
    assert torch.equal(split, unsplit), (split - unsplit).abs().max().item()
