"""The linear layer's math between its projections (`prepare_qkv`, `gate_output`), which the shim and both
engines run: the one-launch engine path equals the cast-first path the precision policy describes, both
match float64, and the engine path traces into a compiled graph as opaque ops."""

from __future__ import annotations

import pytest
import torch

from common_kernels import tiny_config
from common_kernels.model.linear_math import gate_output, prepare_qkv
from common_kernels.ops.norm.naive import group_rms_norm_gate
from common_kernels.ops.rope.fused import qk_norm_rope_packed
from common_kernels.ops.rope.naive import qk_norm_rope, rotary_cos_sin, rotary_inv_freq
from common_kernels.testing import assert_rel_rms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, D = 3, 16
EPS = 1e-6


def _inputs(T: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, 3 * H * D, generator=g) * 3).to(DEVICE, dtype)
    q_w, k_w = (1 + 0.2 * torch.randn(D, generator=g)).to(DEVICE, dtype), torch.rand(D, generator=g).to(DEVICE, dtype)
    inv_freq, scale = rotary_inv_freq(tiny_config(head_dim=D, partial_rotary_factor=0.5))
    cos, sin = rotary_cos_sin(torch.arange(T, device=DEVICE) * 7, inv_freq, scale, torch.float32)
    return qkv, q_w, k_w, cos, sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 5, 33])
def test_the_one_launch_path_equals_casting_first_bit_for_bit(T, dtype):
    qkv, q_w, k_w, cos, sin = _inputs(T, dtype)
    q, k, v = prepare_qkv(qkv, H, q_w, k_w, cos, sin, EPS)  # no autograd: one launch, v a view
    assert q.dtype == k.dtype == torch.float32 and v.dtype == dtype and v.data_ptr() == qkv[:, 2 * H * D :].data_ptr()
    qkv.requires_grad_(True)  # the differentiable path casts first
    q2, k2, v2 = prepare_qkv(qkv, H, q_w, k_w, cos, sin, EPS)
    assert torch.equal(q, q2.detach()) and torch.equal(k, k2.detach()) and torch.equal(v.float(), v2.detach())


@pytest.mark.parametrize("with_norm", [True, False])
def test_prepare_qkv_matches_float64(with_norm):
    qkv, q_w, k_w, cos, sin = _inputs(9, torch.bfloat16, seed=1)
    q_w, k_w = (q_w, k_w) if with_norm else (None, None)
    q, k, v = prepare_qkv(qkv, H, q_w, k_w, cos, sin, EPS)
    heads = qkv.double().view(9, 3 * H, D)
    weights = [None if w is None else w.double() for w in (q_w, k_w)]
    want_q, want_k = qk_norm_rope(heads[:, :H], heads[:, H : 2 * H], *weights, cos.double(), sin.double(), EPS)
    assert_rel_rms("q", want_q, q, 1e-6)
    assert_rel_rms("k", want_k, k, 1e-6)
    assert torch.equal(v.double(), heads[:, 2 * H :])


def test_the_reference_path_equals_the_kernel_path():
    qkv, q_w, k_w, cos, sin = _inputs(7, torch.float32, seed=2)
    fused = prepare_qkv(qkv, H, q_w, k_w, cos, sin, EPS)
    reference = prepare_qkv(qkv, H, q_w, k_w, cos, sin, EPS, use_triton=False)
    for name, a, b in zip("qkv", fused, reference, strict=True):
        assert_rel_rms(name, b.double(), a.to(b.dtype), 1e-6)


def test_silu_applies_to_q_k_and_v_before_the_norms():
    qkv, q_w, k_w, cos, sin = _inputs(4, torch.float32, seed=3)
    q, k, v = prepare_qkv(qkv, H, q_w, k_w, cos, sin, EPS, silu=True)
    plain = prepare_qkv(torch.nn.functional.silu(qkv), H, q_w, k_w, cos, sin, EPS)
    for name, a, b in zip("qkv", (q, k, v), plain, strict=True):
        assert_rel_rms(name, b.double(), a, 1e-6)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_gate_output_is_written_once_in_the_model_dtype(out_dtype):
    g = torch.Generator().manual_seed(4)
    o = torch.randn(6, 4 * D, generator=g).to(DEVICE)
    gate = torch.randn(6, 4 * D, generator=g).to(DEVICE, torch.bfloat16)
    weight = torch.rand(4 * D, generator=g).to(DEVICE)
    y = gate_output(o, gate, weight, 4, EPS, out_dtype)
    reference = gate_output(o, gate, weight, 4, EPS, out_dtype, use_triton=False)
    want = group_rms_norm_gate(o.double(), gate.double(), weight.double(), 4, EPS)
    assert y.dtype == out_dtype
    assert_rel_rms("norm gate", want, y, 1e-6 if out_dtype == torch.float32 else 6e-3)
    if out_dtype == torch.float32:
        assert_rel_rms("norm gate vs reference", reference.double(), y, 1e-6)


def test_gate_output_takes_the_attention_output_per_head_too():
    """SGLang's attention wrapper hands back `[T, H, d]` under its graph runners, `[T, H*d]` otherwise."""
    g = torch.Generator().manual_seed(5)
    o = torch.randn(6, 4, D, generator=g).to(DEVICE)
    gate = torch.randn(6, 4 * D, generator=g).to(DEVICE)
    weight = torch.rand(4 * D, generator=g).to(DEVICE)
    y = gate_output(o, gate, weight, 4, EPS, torch.float32)
    assert torch.equal(y, gate_output(o.reshape(6, -1), gate, weight, 4, EPS, torch.float32))


def test_the_engine_path_traces_into_one_graph():
    """vLLM compiles the layer with fullgraph=True: the fused kernels must be opaque ops, not graph breaks."""
    qkv, q_w, k_w, cos, sin = _inputs(5, torch.float32, seed=5)
    gate = torch.randn(5, H * D, device=DEVICE)

    def layer_math(qkv, gate):
        q, k, v = prepare_qkv(qkv, H, q_w, k_w, cos, sin, EPS)
        return gate_output(q.reshape(5, -1) + v.reshape(5, -1), gate, q_w.repeat(H), H, EPS, torch.float32)

    with torch.no_grad():
        compiled = torch.compile(layer_math, fullgraph=True, backend="eager")(qkv, gate)
        assert torch.equal(compiled, layer_math(qkv, gate))


def test_packed_qk_norm_rope_refuses_bad_arguments():
    qkv, q_w, k_w, cos, sin = _inputs(3, torch.float32)
    heads = qkv.view(3, 3 * H, D)[:, : 2 * H]
    with pytest.raises(ValueError, match="num_q_heads"):
        qk_norm_rope_packed(heads, 2 * H, q_w, k_w, cos, sin, EPS, torch.float32)
    with pytest.raises(ValueError, match="both"):
        qk_norm_rope_packed(heads, H, q_w, None, cos, sin, EPS, torch.float32)
    with pytest.raises(ValueError, match="cos/sin"):
        qk_norm_rope_packed(heads, H, q_w, k_w, cos[:2], sin[:2], EPS, torch.float32)
