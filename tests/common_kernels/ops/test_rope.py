import math

import pytest
import torch

from common_kernels import preset_config, tiny_config
from common_kernels.ops.norm.naive import rms_norm
from common_kernels.ops.rope.naive import apply_partial_rope, qk_norm_rope, rotary_cos_sin, rotary_inv_freq
from common_kernels.testing import assert_rel_rms


def complex_rope_reference(x, positions, inv_freq, rotary_dim):
    """NeoX RoPE as complex multiplication: pair i is (x[i], x[i + r/2]) rotated by position * inv_freq[i]."""
    half = rotary_dim // 2
    z = torch.complex(x[..., :half], x[..., half:rotary_dim])
    angle = positions.double()[:, None, None] * inv_freq.double()[None, None, :]
    z = z * torch.exp(1j * angle)
    return torch.cat((z.real, z.imag, x[..., rotary_dim:]), dim=-1)


@pytest.mark.parametrize("T,heads,d,factor", [(1, 1, 8, 0.5), (9, 3, 16, 0.5), (5, 2, 16, 1.0), (4, 2, 128, 0.5)])
def test_partial_rope_matches_complex_rotation(T, heads, d, factor):
    config = tiny_config(head_dim=d, partial_rotary_factor=factor)
    inv_freq, scale = rotary_inv_freq(config)
    positions = torch.randint(0, 5000, (T,))
    x = torch.randn(T, heads, d, dtype=torch.float64)
    cos, sin = rotary_cos_sin(positions, inv_freq, scale, torch.float64)
    out = apply_partial_rope(x, cos, sin)
    assert_rel_rms("rope", complex_rope_reference(x, positions, inv_freq, config.rotary_dim), out, 1e-13)
    assert torch.equal(out[..., config.rotary_dim :], x[..., config.rotary_dim :])


def test_default_inverse_frequencies():
    config = preset_config("ring-mini-linear-2.0")
    inv_freq, scale = rotary_inv_freq(config)
    assert inv_freq.shape == (32,) and inv_freq.dtype == torch.float32 and scale == 1.0
    expected = torch.tensor([1e6 ** (-2 * i / 64) for i in range(32)], dtype=torch.float64)
    assert_rel_rms("inv_freq", expected, inv_freq, 1e-7)


def test_scores_depend_only_on_relative_position():
    config = tiny_config()
    inv_freq, _ = rotary_inv_freq(config)
    q, k = torch.randn(1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 16, dtype=torch.float64)

    def score(m, n):
        cq, sq = rotary_cos_sin(torch.tensor([m]), inv_freq, 1.0, torch.float64)
        ck, sk = rotary_cos_sin(torch.tensor([n]), inv_freq, 1.0, torch.float64)
        return (apply_partial_rope(q, cq, sq) * apply_partial_rope(k, ck, sk)).sum()

    assert torch.allclose(score(10, 3), score(1007, 1000), rtol=1e-10)


def test_yarn_uses_transformers_yarn_and_scales_cos_sin():
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072}
    config = preset_config("ring-mini-linear-2.0", rope_scaling=yarn, max_position_embeddings=524288)
    inv_freq, scale = rotary_inv_freq(config)
    base, _ = rotary_inv_freq(preset_config("ring-mini-linear-2.0"))
    assert scale == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert torch.allclose(inv_freq[0], base[0])  # fastest pairs extrapolate unchanged
    assert torch.allclose(inv_freq[-1], base[-1] / 4.0)  # slowest pairs interpolate by the factor
    cos, sin = rotary_cos_sin(torch.tensor([0]), inv_freq, scale, torch.float32)
    assert torch.allclose(cos, torch.full_like(cos, scale))


def test_rope_in_fp32_cast_back_and_qk_norm_first():
    config = tiny_config()
    inv_freq, scale = rotary_inv_freq(config)
    cos, sin = rotary_cos_sin(torch.arange(6), inv_freq, scale, torch.float32)
    q, k = torch.randn(6, 4, 16).bfloat16(), torch.randn(6, 2, 16).bfloat16()
    wq, wk = torch.randn(16).bfloat16(), torch.randn(16).bfloat16()
    q2, k2 = qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6)
    assert q2.dtype == k2.dtype == torch.bfloat16
    qf = q.float()
    qn = (qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * wq
    assert torch.equal(q2, apply_partial_rope(qn, cos, sin))


def test_rope_gradients():
    config = tiny_config()
    inv_freq, _ = rotary_inv_freq(config)
    cos, sin = rotary_cos_sin(torch.arange(5), inv_freq, 1.0, torch.float64)
    x = torch.randn(5, 2, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: qk_norm_rope(x, x, w, w, cos, sin, 1e-6)[0], (x, w))


@pytest.mark.parametrize("d,factor,heads,T", [(16, 0.5, 3, 7), (16, 1.0, 2, 5), (32, 0.25, 1, 4), (128, 0.5, 2, 3)])
@pytest.mark.parametrize("with_norm", [True, False])
def test_fused_norm_rope_matches_float64_forward_and_backward(d, factor, heads, T, with_norm):
    from common_kernels.ops.rope.fused import norm_rope_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inv_freq, scale = rotary_inv_freq(tiny_config(head_dim=d, partial_rotary_factor=factor))
    cos, sin = rotary_cos_sin(torch.arange(T, device=device) + 3, inv_freq, scale, torch.float32)
    x = torch.randn(T, 2 * heads, d, device=device)[:, ::2].detach().requires_grad_()  # strided heads
    w = torch.randn(d, device=device, requires_grad=True) if with_norm else None
    dy = torch.randn(T, heads, d, device=device)
    y = norm_rope_triton(x, w, cos, sin, 1e-6)
    leaves = [t.detach().double().requires_grad_() for t in (x, w) if t is not None]
    ref = apply_partial_rope(
        rms_norm(leaves[0], leaves[1], 1e-6) if with_norm else leaves[0], cos.double(), sin.double()
    )
    assert_rel_rms("y", ref, y, 1e-6)
    ins = (x, w) if with_norm else (x,)
    for name, a, b in zip(
        ("dx", "dw"), torch.autograd.grad(ref, leaves, dy.double()), torch.autograd.grad(y, ins, dy), strict=False
    ):
        assert_rel_rms(name, a, b, 1e-6)


def test_fused_qk_norm_rope_reproduces_the_reference_roundings_in_bf16():
    """Bit-identical on a GPU; within one bf16 ulp under the interpreter, whose fp32->bf16 cast truncates."""
    from common_kernels.ops.rope.fused import qk_norm_rope_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inv_freq, scale = rotary_inv_freq(tiny_config())
    cos, sin = rotary_cos_sin(torch.arange(9, device=device), inv_freq, scale, torch.float32)
    q, k = torch.randn(9, 4, 16, device=device).bfloat16(), torch.randn(9, 2, 16, device=device).bfloat16()
    wq, wk = torch.randn(16, device=device).bfloat16(), torch.randn(16, device=device).bfloat16()
    ref = qk_norm_rope(q, k, wq, wk, cos, sin, 1e-6)
    out = qk_norm_rope_triton(q, k, wq, wk, cos, sin, 1e-6)
    for a, b in zip(ref, out, strict=False):
        assert b.dtype == torch.bfloat16
        if device == "cuda":
            assert torch.equal(a, b)
        else:
            assert_rel_rms("bf16", a.double(), b, 1e-2)


@pytest.mark.parametrize("T", [0, 1, 13, 70])
def test_packed_qk_norm_rope_tiles_rows_and_is_batch_invariant(T):
    """q and k heads of one fused output with their own weights, over several row tiles with a ragged last one
    (T x 6 rows against 16-row tiles), against float64; each token's rows are bit for bit those it gets alone, so
    a request's q/k do not depend on which requests share its step."""
    from common_kernels.ops.rope.fused import qk_norm_rope_packed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    Hq, Hk, d = 4, 2, 32
    inv_freq, scale = rotary_inv_freq(tiny_config(head_dim=d, partial_rotary_factor=0.5))
    cos, sin = rotary_cos_sin(torch.arange(T, device=device) + 5, inv_freq, scale, torch.float32)
    qkv = torch.randn(T, Hq + 2 * Hk, d, device=device).bfloat16()  # v heads after q and k: a token stride
    wq, wk = torch.randn(d, device=device), torch.randn(d, device=device)
    out = qk_norm_rope_packed(qkv[:, : Hq + Hk], Hq, wq, wk, cos, sin, 1e-6, torch.float32)
    assert out.shape == (T, Hq + Hk, d) and out.dtype == torch.float32
    if T == 0:
        return
    x = qkv[:, : Hq + Hk].double()
    q_ref = apply_partial_rope(rms_norm(x[:, :Hq], wq.double(), 1e-6), cos.double(), sin.double())
    k_ref = apply_partial_rope(rms_norm(x[:, Hq:], wk.double(), 1e-6), cos.double(), sin.double())
    assert_rel_rms("q", q_ref, out[:, :Hq], 1e-6)
    assert_rel_rms("k", k_ref, out[:, Hq:], 1e-6)
    for t in {0, T // 2, T - 1}:
        alone = qk_norm_rope_packed(
            qkv[t : t + 1, : Hq + Hk], Hq, wq, wk, cos[t : t + 1], sin[t : t + 1], 1e-6, torch.float32
        )
        assert torch.equal(alone[0], out[t])


def test_the_engines_rotary_table_holds_the_bits_the_shim_computes_at_each_position():
    from common_kernels.ops.rope.naive import rotary_table

    inv_freq, scaling = rotary_inv_freq(tiny_config())
    cos, sin = rotary_table(300, inv_freq, scaling, torch.float32)
    positions = torch.tensor([0, 7, 299, 64, 7])
    want_cos, want_sin = rotary_cos_sin(positions, inv_freq, scaling, torch.float32)
    assert torch.equal(cos[positions], want_cos) and torch.equal(sin[positions], want_sin)


YARN_4X = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072}


@pytest.mark.parametrize("rope_scaling", [None, YARN_4X])
def test_inverse_frequencies_are_computed_on_the_cpu_under_any_default_device(rope_scaling):
    """The engines build their models under a GPU device context; the frequencies must still come from the CPU's
    arithmetic, the shim's (the meta device stands in for the GPU here: it would compute nothing)."""
    config = preset_config("ring-mini-linear-2.0", rope_scaling=rope_scaling, max_position_embeddings=524288)
    want, _ = rotary_inv_freq(config)
    with torch.device("meta"):
        got, _ = rotary_inv_freq(config)
    assert got.device.type == "cpu" and torch.equal(got, want)


def test_decay_rates_are_computed_on_the_cpu_under_any_default_device():
    from common_kernels.slopes import decay_rates

    config = preset_config("ring-mini-linear-2.0")
    with torch.device("meta"):
        got = decay_rates(config, 3)
    assert got.device.type == "cpu" and torch.equal(got, decay_rates(config, 3))
