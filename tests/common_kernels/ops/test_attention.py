import pytest
import torch

from common_kernels.ops.attention.naive import causal_gqa_attention
from common_kernels.testing import assert_rel_rms


def loop_reference(q, k, v, scale):
    """One query, one head at a time: softmax over the keys at or before the query's position."""
    Tq, Hq, _ = q.shape
    Tk, Hkv, _ = k.shape
    out = torch.zeros_like(q)
    for i in range(Tq):
        visible = Tk - Tq + i + 1
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            s = torch.stack([q[i, h] @ k[j, kv] * scale for j in range(visible)])
            p = torch.exp(s - s.max())
            p = p / p.sum()
            out[i, h] = sum(p[j] * v[j, kv] for j in range(visible))
    return out


@pytest.mark.parametrize(
    "Tq,Tk,Hq,Hkv,d", [(1, 1, 2, 1, 4), (6, 6, 4, 2, 8), (1, 9, 4, 1, 8), (3, 10, 6, 3, 4), (13, 13, 8, 8, 16)]
)
def test_matches_loop_reference(Tq, Tk, Hq, Hkv, d):
    q = torch.randn(Tq, Hq, d, dtype=torch.float64)
    k, v = torch.randn(Tk, Hkv, d, dtype=torch.float64), torch.randn(Tk, Hkv, d, dtype=torch.float64)
    assert_rel_rms("attention", loop_reference(q, k, v, d**-0.5), causal_gqa_attention(q, k, v, d**-0.5), 1e-13)


def test_decode_rows_equal_last_rows_of_prefill():
    q = torch.randn(10, 4, 8, dtype=torch.float64)
    k, v = torch.randn(10, 2, 8, dtype=torch.float64), torch.randn(10, 2, 8, dtype=torch.float64)
    full = causal_gqa_attention(q, k, v, 0.3)
    assert torch.allclose(causal_gqa_attention(q[7:], k, v, 0.3), full[7:], rtol=0, atol=1e-14)


def test_bf16_in_fp32_softmax_out_bf16_and_rejects_more_queries_than_keys():
    q, k, v = torch.randn(4, 2, 8).bfloat16(), torch.randn(4, 1, 8).bfloat16(), torch.randn(4, 1, 8).bfloat16()
    out = causal_gqa_attention(q, k, v, 0.35)
    assert out.dtype == torch.bfloat16
    assert_rel_rms("bf16", causal_gqa_attention(q.double(), k.double(), v.double(), 0.35), out, 1e-2)
    with pytest.raises(ValueError, match="3 keys for 4 queries"):
        causal_gqa_attention(q, k[:3], v[:3], 0.35)
