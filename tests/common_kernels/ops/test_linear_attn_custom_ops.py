"""The custom-op wrappers: schema, fake tensors and AOT dispatch (torch.library.opcheck), same results as the
direct calls, and a full-graph torch.compile trace with the in-place pool update."""

import torch

from common_kernels.ops.linear_attn.custom_ops import linear_attention_decode_op, linear_attention_prefill_op
from common_kernels.ops.linear_attn.decode import linear_attention_decode
from common_kernels.ops.linear_attn.prefill import linear_attention_prefill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, K, V = 2, 16, 16


def inputs():
    q, k, v = (torch.randn(10, H, d, device=DEVICE) for d in (K, K, V))
    rate = torch.tensor([0.3, 0.01], device=DEVICE)
    cu = torch.tensor([0, 4, 10], device=DEVICE)
    pool = torch.randn(3, H, K, V, device=DEVICE)
    slots = torch.tensor([2, 0], device=DEVICE)
    fresh = torch.tensor([1, 0], dtype=torch.int8, device=DEVICE)
    return q, k, v, rate, cu, pool, slots, fresh


def test_opcheck():
    q, k, v, rate, cu, pool, slots, fresh = inputs()
    torch.library.opcheck(linear_attention_prefill_op, (q, k, v, rate, 0.25, cu, pool, slots, fresh), {"max_seqlen": 6})
    torch.library.opcheck(linear_attention_decode_op, (q[:2], k[:2], v[:2], rate, 0.25, pool, slots))


def test_ops_equal_the_direct_calls_including_the_pool_update():
    q, k, v, rate, cu, pool, slots, fresh = inputs()
    pool_a, pool_b = pool.clone(), pool.clone()
    o_a = linear_attention_prefill_op(q, k, v, rate, 0.25, cu, pool_a, slots, fresh)
    o_b = linear_attention_prefill(q, k, v, rate, 0.25, cu, pool_b, slots, fresh)
    assert torch.equal(o_a, o_b) and torch.equal(pool_a, pool_b)
    d_a = linear_attention_decode_op(q[:2], k[:2], v[:2], rate, 0.25, pool_a, slots)
    d_b = linear_attention_decode(q[:2], k[:2], v[:2], rate, 0.25, pool_b, slots)
    assert torch.equal(d_a, d_b) and torch.equal(pool_a, pool_b)


def test_full_graph_compile_keeps_the_in_place_update():
    q, k, v, rate, cu, pool, slots, fresh = inputs()
    expected_pool = pool.clone()
    expected = linear_attention_decode(q[:2], k[:2], v[:2], rate, 0.25, expected_pool, slots)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k, v, pool):
        return linear_attention_decode_op(q, k, v, rate, 0.25, pool, slots) * 2

    out = step(q[:2], k[:2], v[:2], pool)
    assert torch.equal(out, expected * 2) and torch.equal(pool, expected_pool)
