"""The vLLM linear-attention layer against the training shim's, on the Triton kernels (interpreted on CPU).

A mixed step (a continuing decode, a one-token prompt, a new prompt, the second chunk of a chunked
prefill) must give, token for token, what the shim computes over the whole sequences.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from common_kernels import RingLinearForCausalLM  # noqa: E402
from common_kernels.model.layers import ForwardContext  # noqa: E402
from common_kernels.ops.rope.naive import rotary_cos_sin, rotary_inv_freq  # noqa: E402

LAYER = 1  # a linear layer with an MoE MLP after it; the slot pool has stale values in every slot


def _run_step(layer, cfg, hidden, positions, query_lens, seq_lens, slots, builder, tools):
    from vllm.forward_context import set_forward_context

    common = tools.common_metadata(query_lens, seq_lens, slots, hidden.device)
    metadata = builder.build(0, common)
    output = torch.zeros_like(hidden)
    with set_forward_context({layer.prefix: metadata}, cfg):
        layer(hidden, output, positions)
    return output


def test_mixed_prefill_decode_step_matches_the_shim(vllm_tools, tiny_dir):
    cfg = vllm_tools.engine_config(tiny_dir)
    model = vllm_tools.build_model(cfg)
    shim = RingLinearForCausalLM.from_pretrained(tiny_dir, use_triton=False)  # the float references
    with vllm_tools.single_rank(cfg):
        model.load_weights(shim.state_dict().items())
        layer = model.model.layers[LAYER].attention
        device = layer.decay_rate.device
        layer.kv_cache = (torch.randn(8, 4, 16, 16, device=device),)  # stale memory everywhere
        builder = layer.get_attn_backend().get_builder_cls()(layer.get_kv_cache_spec(cfg), [layer.prefix], cfg, device)

        # four sequences: A (5 tokens, then 1 decode), B (a 1-token prompt), C (a 7-token prompt),
        # D (9 tokens, then a chunk of 6); slots A=5, B=2, C=3, D=0
        lengths = {"A": 6, "B": 1, "C": 7, "D": 15}
        torch.manual_seed(3)
        hidden = {n: torch.randn(L, 64, device=device) for n, L in lengths.items()}

        def rows(parts):
            return torch.cat([hidden[n][a:b] for n, a, b in parts]), torch.cat(
                [torch.arange(a, b, device=device) for _, a, b in parts]
            )

        h1, p1 = rows([("A", 0, 5), ("D", 0, 9)])  # step 1: two fresh prefills
        _run_step(layer, cfg, h1, p1, [5, 9], [5, 9], [5, 0], builder, vllm_tools)
        h2, p2 = rows([("A", 5, 6), ("B", 0, 1), ("C", 0, 7), ("D", 9, 15)])  # step 2: mixed
        got = _run_step(layer, cfg, h2, p2, [1, 1, 7, 6], [6, 1, 7, 15], [5, 2, 3, 0], builder, vllm_tools)

    # the shim's layer over the whole sequences, from zero states
    full = torch.cat([hidden[n] for n in lengths])
    positions = torch.cat([torch.arange(L) for L in lengths.values()])
    cu = [0, *torch.tensor(list(lengths.values())).cumsum(0).tolist()]
    cos, sin = rotary_cos_sin(positions, *rotary_inv_freq(shim.config), torch.float32)
    ctx = ForwardContext(cu, torch.tensor(cu), cos, sin, cache=None)
    with torch.no_grad():
        want_all = shim.model.layers[LAYER].attention(full.cpu(), ctx)
    offsets = dict(zip(lengths, cu[:-1], strict=True))
    step2 = [("A", 5, 6), ("B", 0, 1), ("C", 0, 7), ("D", 9, 15)]
    want = torch.cat([want_all[offsets[n] + a : offsets[n] + b] for n, a, b in step2])
    err = (got.cpu() - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), f"max abs error {err}"
