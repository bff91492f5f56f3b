import pytest
import torch

from common_kernels import decay_rates, preset_config
from common_kernels.ops.linear_attn.naive import (
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_varlen,
)
from common_kernels.testing import assert_rel_rms, ragged_offsets, rel_rms_error

MINI = preset_config("ring-mini-linear-2.0")
# The fastest and the slowest decays of Ring-mini: layer 0 head 0 and layer 18 head 15.
FASTEST = decay_rates(MINI, 0, torch.float64)[0].item()
SLOWEST = decay_rates(MINI, 18, torch.float64)[-1].item()


def quadratic_reference(q, k, v, rate, scale, s0):
    """The closed form of the recurrence, all tokens at once:

    o_t = scale * (lam^(t+1) q_t S0 + sum_{s<=t} lam^(t-s) (q_t . k_s) v_s)
    S_T = lam^T S0 + sum_s lam^(T-1-s) k_s^T v_s
    """
    T = q.shape[0]
    t = torch.arange(T, dtype=torch.float64)
    diff = t[:, None] - t[None, :]
    weights = torch.where(diff >= 0, torch.exp(-rate[:, None, None] * diff.clamp(min=0)), 0.0)  # [H, T, T]
    scores = torch.einsum("thd,shd->hts", q, k) * weights
    o = torch.einsum("hts,shv->thv", scores, v) + torch.einsum(
        "thk,hkv,ht->thv", q, s0, torch.exp(-rate[:, None] * (t + 1))
    )
    final = torch.exp(-rate * T)[:, None, None] * s0 + torch.einsum(
        "shk,shv,hs->hkv", k, v, torch.exp(-rate[:, None] * (T - 1 - t))
    )
    return scale * o, final


def make_inputs(T, H, dk, dv, dtype=torch.float64, state=True):
    q, k = torch.randn(T, H, dk, dtype=dtype), torch.randn(T, H, dk, dtype=dtype)
    v = torch.randn(T, H, dv, dtype=dtype)
    s0 = torch.randn(H, dk, dv, dtype=torch.float64) if state else None
    return q, k, v, s0


CASES = [
    pytest.param(T, H, dk, dv, rates, id=f"T{T}-H{H}-dk{dk}-dv{dv}-{name}")
    for T, H, dk, dv in [(0, 2, 8, 8), (1, 3, 8, 4), (7, 2, 16, 16), (63, 4, 8, 12), (65, 2, 16, 8), (130, 1, 4, 4)]
    for name, rates in [("mixed", None), ("fastest", FASTEST), ("slowest", SLOWEST)]
]


def _rates(H, rates):
    return (
        torch.linspace(0.01, 1.0, H, dtype=torch.float64)
        if rates is None
        else torch.full((H,), rates, dtype=torch.float64)
    )


@pytest.mark.parametrize("T,H,dk,dv,rates", CASES)
def test_recurrent_matches_quadratic_form(T, H, dk, dv, rates):
    q, k, v, s0 = make_inputs(T, H, dk, dv)
    rate = _rates(H, rates)
    o, s = linear_attention_recurrent(q, k, v, rate, dk**-0.5, s0)
    o_ref, s_ref = quadratic_reference(q, k, v, rate, dk**-0.5, s0)
    assert_rel_rms("o", o_ref, o, 1e-12)
    assert_rel_rms("state", s_ref, s, 1e-12)


@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("T,H,dk,dv,rates", CASES)
def test_chunked_matches_recurrent(T, H, dk, dv, rates, chunk_size):
    q, k, v, s0 = make_inputs(T, H, dk, dv)
    rate = _rates(H, rates)
    o_ref, s_ref = linear_attention_recurrent(q, k, v, rate, dk**-0.5, s0)
    o, s = linear_attention_chunked(q, k, v, rate, dk**-0.5, s0, chunk_size=chunk_size)
    assert_rel_rms("o", o_ref, o, 1e-12)
    assert_rel_rms("state", s_ref, s, 1e-12)


def test_zero_initial_state_is_the_default():
    q, k, v, _ = make_inputs(9, 2, 8, 8)
    rate = _rates(2, None)
    o1, s1 = linear_attention_chunked(q, k, v, rate, 0.3)
    o2, s2 = linear_attention_chunked(q, k, v, rate, 0.3, torch.zeros(2, 8, 8, dtype=torch.float64))
    assert torch.equal(o1, o2) and torch.equal(s1, s2)


def test_float32_and_bf16_inputs_compute_in_fp32():
    q, k, v, s0 = make_inputs(40, 2, 16, 16)
    rate = _rates(2, None)
    o64, s64 = linear_attention_recurrent(q, k, v, rate, 0.25, s0)
    o32, s32 = linear_attention_chunked(q.float(), k.float(), v.float(), rate, 0.25, s0.float())
    assert o32.dtype == s32.dtype == torch.float32
    assert_rel_rms("o fp32", o64, o32, 1e-6)
    ob, sb = linear_attention_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), rate, 0.25, s0.float())
    assert ob.dtype == sb.dtype == torch.float32  # bf16 inputs, fp32 state and output


@pytest.mark.parametrize("lengths", [[5], [0, 3], [1, 0, 7, 1], [64, 65, 0, 2], [0, 0]], ids=str)
@pytest.mark.parametrize("with_state", [False, True])
def test_varlen_matches_separate_sequences(lengths, with_state):
    H, d = 2, 8
    cu = ragged_offsets(lengths)
    q, k, v, _ = make_inputs(int(cu[-1]), H, d, d)
    states = torch.randn(len(lengths), H, d, d, dtype=torch.float64) if with_state else None
    rate = _rates(H, None)
    for chunked in (True, False):
        o, finals = linear_attention_varlen(q, k, v, rate, 0.5, cu, states, chunked=chunked, chunk_size=16)
        for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=False)):
            init = None if states is None else states[n]
            o_ref, s_ref = quadratic_reference(
                q[a:b], k[a:b], v[a:b], rate, 0.5, torch.zeros(H, d, d, dtype=torch.float64) if init is None else init
            )
            assert_rel_rms(f"o[{n}]", o_ref, o[a:b], 1e-12)
            assert_rel_rms(f"state[{n}]", s_ref, finals[n], 1e-12)
            if b == a:  # a zero-length sequence hands its initial state back unchanged
                expected = torch.zeros(H, d, d, dtype=torch.float64) if init is None else init
                assert torch.equal(finals[n], expected)


def test_varlen_rejects_bad_offsets_and_state_shapes():
    q, k, v, _ = make_inputs(6, 2, 4, 4)
    rate = _rates(2, None)
    with pytest.raises(ValueError, match="does not partition"):
        linear_attention_varlen(q, k, v, rate, 1.0, torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="does not partition"):
        linear_attention_varlen(q, k, v, rate, 1.0, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="holds 1 states for 2 sequences"):
        linear_attention_varlen(q, k, v, rate, 1.0, torch.tensor([0, 2, 6]), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="initial_state has shape"):
        linear_attention_recurrent(q, k, v, rate, 1.0, torch.zeros(2, 4, 5))


def test_chunked_gradients_match_finite_differences():
    q, k, v, s0 = make_inputs(11, 2, 4, 3)
    rate = _rates(2, None)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, s0))

    def f(q, k, v, s0):
        return linear_attention_chunked(q, k, v, rate, 0.5, s0, chunk_size=4)

    assert torch.autograd.gradcheck(f, inputs)


def test_long_decode_fp32_state_holds_where_a_bf16_state_drifts():
    """4096 single-token steps at Ring-mini's slowest decay, bf16 inputs, float64 reference on the same inputs.

    The fp32 state (the policy) stays within 1e-4; a state rounded to bf16 after every step drifts by
    several percent, which is why the state is never kept in bf16.
    """
    H, d, steps = 2, 16, 4096
    q, k, v = (torch.randn(steps, H, d).bfloat16() for _ in range(3))
    rate = torch.full((H,), SLOWEST, dtype=torch.float64)
    _, s64 = linear_attention_recurrent(q.double(), k.double(), v.double(), rate, d**-0.5)
    _, s32 = linear_attention_recurrent(q, k, v, rate, d**-0.5)
    assert s32.dtype == torch.float32
    assert_rel_rms("fp32 state after 4096 steps", s64, s32, 1e-4)
    lam = torch.exp(-rate.float())[:, None, None]
    s16 = torch.zeros(H, d, d, dtype=torch.bfloat16)
    for t in range(steps):
        s16 = (lam * s16.float() + k[t].float()[:, :, None] * v[t].float()[:, None, :]).bfloat16()
    assert rel_rms_error(s64, s16) > 0.03
