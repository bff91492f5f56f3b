"""Triton prefill and decode against the float64 reference (CPU: TRITON_INTERPRET, small shapes; GPU: real shapes)."""

import os
import subprocess
import sys

import pytest
import torch

from common_kernels import decay_rates, preset_config
from common_kernels.ops import triton_settings
from common_kernels.ops.linear_attn.decode import linear_attention_decode
from common_kernels.ops.linear_attn.naive import linear_attention_recurrent, linear_attention_varlen
from common_kernels.ops.linear_attn.prefill import linear_attention_prefill, plan_prefill
from common_kernels.testing import (
    assert_rel_rms,
    check_prefill_on_a_stale_pool,
    kernel_tolerance,
    pool_reference,
    ragged_offsets,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MINI = preset_config("ring-mini-linear-2.0")
FASTEST, SLOWEST = decay_rates(MINI, 0)[0].item(), decay_rates(MINI, 18)[-1].item()
# the HF convention shifts the layer index: its layer 0 decays faster than any engine-convention layer
MINI_HF = preset_config("ring-mini-linear-2.0", linear_decay_convention="hf")
FASTEST_HF = decay_rates(MINI_HF, 0)[0].item()
BF16_TOL, FP32_TOL = kernel_tolerance(torch.bfloat16), kernel_tolerance(torch.float32)


def fused_qkv(T, H, K, V, dtype):
    """q, k, v as strided views of one `[T, H*(2K+V)]` projection output, as the model produces them."""
    qkv = torch.randn(T, H * (2 * K + V), device=DEVICE).to(dtype)
    q, k, v = qkv.split([H * K, H * K, H * V], dim=1)
    return q.view(T, H, K), k.view(T, H, K), v.view(T, H, V)


def rates_for(H, kind):
    if kind == "mixed":
        return torch.linspace(0.01, 0.9, H)
    return torch.full((H,), {"fastest": FASTEST, "slowest": SLOWEST, "fastest-hf": FASTEST_HF}[kind])


PREFILL_CASES = [
    # lengths, H, K, V, chunk, segment
    ([37, 0, 1, 80, 16], 2, 16, 32, 16, 32),
    ([1], 3, 16, 16, 16, 16),
    ([0, 0], 2, 16, 16, 16, 32),
    ([130], 1, 32, 16, 32, 64),
    ([15, 17, 64, 65], 2, 16, 16, 16, 64),
    ([50, 0, 200], 2, 64, 64, 32, 64),  # a 64 x 64 state: two scan programs per (sequence, head)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decay", ["mixed", "fastest", "slowest", "fastest-hf"])
@pytest.mark.parametrize("lengths,H,K,V,chunk,segment", PREFILL_CASES, ids=[str(c[0]) for c in PREFILL_CASES])
def test_prefill_matches_float64_reference(lengths, H, K, V, chunk, segment, decay, dtype):
    cu = ragged_offsets(lengths).to(DEVICE)
    q, k, v = fused_qkv(int(cu[-1]), H, K, V, dtype)
    rate = rates_for(H, decay).to(DEVICE)
    check_prefill_on_a_stale_pool(
        lambda pool, slots, fresh: linear_attention_prefill(
            q, k, v, rate, K**-0.5, cu, pool, slots, fresh, chunk_size=chunk, segment_size=segment, block_v=16
        ),
        q, k, v, rate, K**-0.5, cu, spare=3,
    )  # fmt: skip


def test_prefill_default_segmentation_and_rejected_inputs():
    q, k, v = fused_qkv(50, 2, 16, 16, torch.float32)
    cu = torch.tensor([0, 20, 50], device=DEVICE)
    pool = torch.zeros(2, 2, 16, 16, device=DEVICE)
    rate = rates_for(2, "mixed").to(DEVICE)
    o = linear_attention_prefill(q, k, v, rate, 0.25, cu, pool, torch.tensor([0, 1], device=DEVICE))
    o_ref, _ = linear_attention_varlen(q.double(), k.double(), v.double(), rate.double(), 0.25, cu.cpu())
    assert_rel_rms("o", o_ref, o, FP32_TOL)
    with pytest.raises(ValueError, match="float32"):
        linear_attention_prefill(q, k, v, rate, 0.25, cu, pool.half(), torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(ValueError, match="slots must be"):
        linear_attention_prefill(q, k, v, rate, 0.25, cu, pool, torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="powers of two"):
        linear_attention_prefill(q[..., :12], k[..., :12], v, rate, 0.25, cu, pool, torch.tensor([0, 1], device=DEVICE))


def test_prefill_with_a_plan_built_once_for_several_layers():
    """Engines build the segment tables once per step (`plan_prefill`) and hand them to every layer."""
    H, K = 2, 16
    cu = ragged_offsets([45, 1, 0, 70]).to(DEVICE)
    T = int(cu[-1])
    plan = plan_prefill(cu, T, H, K, chunk_size=16, segment_size=32)
    slots = torch.tensor([3, 0, 1, 2], device=DEVICE)
    fresh = torch.tensor([1, 0, 0, 1], dtype=torch.int8, device=DEVICE)
    initial = torch.randn(4, H, K, K, device=DEVICE)
    for layer in range(2):  # two layers, one plan: each must equal its own float64 reference
        q, k, v = fused_qkv(T, H, K, K, torch.float32)
        rate = rates_for(H, "mixed").to(DEVICE) * (layer + 1)
        pool = initial.clone()
        o = linear_attention_prefill(q, k, v, rate, K**-0.5, cu, pool, slots, fresh, chunk_size=16, plan=plan)
        o_ref, s_ref = pool_reference(q, k, v, rate, K**-0.5, cu, initial, slots, fresh)
        assert_rel_rms(f"layer {layer} o", o_ref, o, FP32_TOL)
        for n, s in enumerate(slots.tolist()):
            assert_rel_rms(f"layer {layer} state[{n}]", s_ref[n], pool[s], FP32_TOL)
    with pytest.raises(ValueError, match="plan was made for 116 tokens, q has 115"):
        linear_attention_prefill(q[1:], k[1:], v[1:], rate, 0.25, cu, pool, slots, fresh, chunk_size=16, plan=plan)
    with pytest.raises(ValueError, match="segment_size 32 must be a multiple of chunk_size 64"):
        linear_attention_prefill(q, k, v, rate, 0.25, cu, pool, slots, fresh, chunk_size=64, plan=plan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens_per_seq", [1, 3])
@pytest.mark.parametrize("with_fresh", [False, True], ids=["continue", "fresh-rows"])
def test_decode_matches_reference_in_place_and_skips_padding(tokens_per_seq, dtype, with_fresh):
    B, H, K, V = 4, 2, 16, 32
    q, k, v = fused_qkv(B * tokens_per_seq, H, K, V, dtype)
    rate = rates_for(H, "mixed").to(DEVICE)
    pool = torch.randn(6, H, K, V, device=DEVICE)
    slots = torch.tensor([4, -1, 1, 0], device=DEVICE)
    fresh = torch.tensor([0, 1, 1, 0], dtype=torch.int8, device=DEVICE) if with_fresh else None
    updated = pool.clone()
    o = linear_attention_decode(q, k, v, rate, 0.25, updated, slots, tokens_per_seq=tokens_per_seq, fresh=fresh)
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL
    for b, s in enumerate(slots.tolist()):
        rows = slice(b * tokens_per_seq, (b + 1) * tokens_per_seq)
        if s < 0:
            assert torch.equal(o[rows], torch.zeros_like(o[rows]))
            continue
        initial = torch.zeros_like(pool[s]) if fresh is not None and fresh[b] else pool[s]  # fresh: stale slot ignored
        o_ref, s_ref = linear_attention_recurrent(
            q[rows].double(), k[rows].double(), v[rows].double(), rate.double(), 0.25, initial.double()
        )
        assert_rel_rms(f"o[{b}]", o_ref, o[rows], tol)
        assert_rel_rms(f"state[{b}]", s_ref, updated[s], 1e-5)
    assert torch.equal(updated[[2, 3, 5]], pool[[2, 3, 5]])


def test_decode_rejects_bad_arguments():
    q, k, v = fused_qkv(6, 2, 16, 16, torch.float32)
    rate = rates_for(2, "mixed").to(DEVICE)
    pool = torch.zeros(4, 2, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not split into sequences of 4 tokens"):
        linear_attention_decode(q, k, v, rate, 0.25, pool, torch.arange(2, device=DEVICE), tokens_per_seq=4)
    with pytest.raises(ValueError, match=r"slots must be \[3\]"):
        linear_attention_decode(q, k, v, rate, 0.25, pool, torch.arange(2, device=DEVICE), tokens_per_seq=2)
    with pytest.raises(ValueError, match=r"state_pool must be \[P, 2, 16, 16\]"):
        linear_attention_decode(q, k, v, rate, 0.25, pool[:, :1], torch.arange(6, device=DEVICE))
    with pytest.raises(ValueError, match=r"fresh must be \[6\]"):
        linear_attention_decode(q, k, v, rate, 0.25, pool, torch.arange(6, device=DEVICE), fresh=torch.ones(2))
    with pytest.raises(ValueError, match="unit stride"):
        linear_attention_decode(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rate, 0.25, pool, torch.arange(6, device=DEVICE)
        )


def test_bf16_pool_on_request_matches_the_fp32_pool_up_to_state_rounding():
    """An engine user may ask for a bf16 state; the kernels then widen it on load and round it on store."""
    H, K, V = 2, 16, 16
    cu = torch.tensor([0, 20, 50], device=DEVICE)
    q, k, v = fused_qkv(50 + 2, H, K, V, torch.float32)
    rate = rates_for(H, "mixed").to(DEVICE)
    slots = torch.tensor([1, 0], device=DEVICE)
    pools = {dtype: (torch.randn(2, H, K, V, device=DEVICE) * 0.1).to(dtype) for dtype in (torch.float32,)}
    pools[torch.bfloat16] = pools[torch.float32].bfloat16()
    pools[torch.float32] = pools[torch.bfloat16].float()  # the same starting values in both pools
    outs = {}
    for dtype, pool in pools.items():
        fresh = torch.tensor([0, 1], dtype=torch.int8, device=DEVICE)
        o_p = linear_attention_prefill(q[:50], k[:50], v[:50], rate, 0.25, cu, pool, slots, fresh)
        o_d = linear_attention_decode(q[50:], k[50:], v[50:], rate, 0.25, pool, slots)
        outs[dtype] = (o_p, o_d, pool.float())
    names = ("prefill o", "decode o", "state")
    for got, want, name in zip(outs[torch.bfloat16], outs[torch.float32], names, strict=True):
        assert_rel_rms(name, want.double(), got, 1e-2)
    assert pools[torch.bfloat16].dtype == torch.bfloat16


def test_prefill_then_decode_continues_the_same_sequences():
    H, K, V = 2, 16, 16
    lengths = [21, 9]
    total = [n + 4 for n in lengths]
    q, k, v = fused_qkv(sum(total), H, K, V, torch.float32)
    rate = rates_for(H, "mixed").to(DEVICE)
    cu_all = ragged_offsets(total)
    o_ref, s_ref = linear_attention_varlen(q.double(), k.double(), v.double(), rate.double(), 0.25, cu_all)
    pool = torch.full((2, H, K, V), float("nan"), device=DEVICE)
    slots = torch.tensor([1, 0], device=DEVICE)
    prompt_rows = torch.cat([torch.arange(a, a + n) for a, n in zip(cu_all[:-1].tolist(), lengths, strict=False)])
    o_pre = linear_attention_prefill(
        q[prompt_rows],
        k[prompt_rows],
        v[prompt_rows],
        rate,
        0.25,
        ragged_offsets(lengths).to(DEVICE),
        pool,
        slots,
        chunk_size=16,
        segment_size=16,
    )
    assert_rel_rms("prefill", o_ref[prompt_rows], o_pre, FP32_TOL)
    for step in range(4):  # the decode multiplies exactly, but continues the state the prefill left
        rows = torch.tensor([a + n + step for a, n in zip(cu_all[:-1].tolist(), lengths, strict=False)])
        o = linear_attention_decode(q[rows], k[rows], v[rows], rate, 0.25, pool, slots)
        assert_rel_rms(f"decode step {step}", o_ref[rows], o, FP32_TOL)
    for n, s in enumerate(slots.tolist()):
        assert_rel_rms(f"final state {n}", s_ref[n], pool[s], FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[4096], [1000, 1, 0, 3000, 77], [64] * 16 + [2048]], ids=["4K", "ragged", "mix"])
@pytest.mark.parametrize("layer", [0, 18])
def test_prefill_real_shape_bf16(lengths, layer):
    H, d = 16, 128
    cu = ragged_offsets(lengths).to(DEVICE)
    q, k, v = fused_qkv(int(cu[-1]), H, d, d, torch.bfloat16)
    rate = decay_rates(MINI, layer).to(DEVICE)
    N = len(lengths)
    pool = torch.randn(N, H, d, d, device=DEVICE) * 0.1
    slots = torch.arange(N, device=DEVICE).flip(0)
    fresh = torch.zeros(N, dtype=torch.int8, device=DEVICE)
    updated = pool.clone()
    o = linear_attention_prefill(q, k, v, rate, d**-0.5, cu, updated, slots, fresh)
    o_ref, s_ref = pool_reference(q, k, v, rate, d**-0.5, cu, pool, slots, fresh)
    assert_rel_rms("o", o_ref, o, 3e-3)
    for n, s in enumerate(slots.tolist()):
        assert_rel_rms(f"state[{n}]", s_ref[n], updated[s], 3e-3)


def test_an_unknown_fp32_dot_setting_is_refused_with_the_choices():
    env = {**os.environ, "RING_LINEAR_FP32_DOT": "fp64"}
    code = "import common_kernels.ops.triton_settings"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "RING_LINEAR_FP32_DOT='fp64'" in out.stderr and "tf32, tf32x3, ieee" in out.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("tf32", 2e-3), ("tf32x3", 2e-5), ("ieee", 2e-5)])
def test_prefill_fp32_products_on_a_gpu(precision, tol, monkeypatch):
    """fp32 q/k/v at the real head size: TF32 within 2e-3 of float64, the 3xTF32 and exact products within 2e-5."""
    monkeypatch.setattr(triton_settings, "FP32_DOT_PRECISION", precision)
    H, d, lengths = 16, 128, [1000, 1, 0, 700]
    cu = ragged_offsets(lengths).to(DEVICE)
    q, k, v = fused_qkv(int(cu[-1]), H, d, d, torch.float32)
    rate = decay_rates(MINI, 18).to(DEVICE)
    N = len(lengths)
    pool = torch.randn(N, H, d, d, device=DEVICE) * 0.1
    slots = torch.arange(N, device=DEVICE)
    fresh = torch.zeros(N, dtype=torch.int8, device=DEVICE)
    updated = pool.clone()
    o = linear_attention_prefill(q, k, v, rate, d**-0.5, cu, updated, slots, fresh)
    o_ref, s_ref = pool_reference(q, k, v, rate, d**-0.5, cu, pool, slots, fresh)
    assert_rel_rms("o", o_ref, o, tol)
    for n in range(N):
        assert_rel_rms(f"state[{n}]", s_ref[n], updated[n], tol)


@pytest.mark.gpu
def test_4096_step_decode_keeps_the_fp32_state_within_half_a_percent():
    H, d, B, steps = 16, 128, 2, 4096
    rate = decay_rates(MINI, 18).to(DEVICE)
    q, k, v = fused_qkv(steps * B, H, d, d, torch.bfloat16)
    pool = torch.zeros(B, H, d, d, device=DEVICE)
    slots = torch.arange(B, device=DEVICE)
    for t in range(steps):
        linear_attention_decode(
            q[t * B : (t + 1) * B], k[t * B : (t + 1) * B], v[t * B : (t + 1) * B], rate, d**-0.5, pool, slots
        )
    for b in range(B):
        rows = slice(b, steps * B, B)
        _, s_ref = linear_attention_recurrent(
            q[rows].double(), k[rows].double(), v[rows].double(), rate.double(), d**-0.5
        )
        assert_rel_rms(f"state[{b}]", s_ref, pool[b], 5e-3)


BACKWARD_CASES = [  # lengths, chunk, segment, K, V
    ([37, 0, 1, 80, 16], 16, 32, 16, 32),
    ([5], 16, 16, 16, 32),
    ([64, 65], 32, 64, 16, 32),
    ([0, 3], 16, 16, 16, 32),
    ([50, 130], 32, 32, 64, 64),  # a 64 x 64 state: two scan programs per (sequence, head)
]


@pytest.mark.parametrize("with_initial,with_dfinal", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("decay", ["mixed", "slowest"])
@pytest.mark.parametrize("lengths,chunk,segment,K,V", BACKWARD_CASES, ids=[str(c[0]) for c in BACKWARD_CASES])
def test_triton_autograd_matches_float64_gradients(lengths, chunk, segment, K, V, decay, with_initial, with_dfinal):
    from common_kernels.ops.linear_attn.backward import linear_attention_varlen_triton

    H = 2
    cu = ragged_offsets(lengths).to(DEVICE)
    T, N = int(cu[-1]), len(lengths)
    q, k, v = (torch.randn(T, H, d, device=DEVICE, requires_grad=True) for d in (K, K, V))
    h0 = torch.randn(N, H, K, V, device=DEVICE, requires_grad=True) if with_initial else None
    rate = rates_for(H, decay).to(DEVICE)
    do = torch.randn(T, H, V, device=DEVICE)
    dht = torch.randn(N, H, K, V, device=DEVICE)
    o, ht = linear_attention_varlen_triton(q, k, v, rate, 0.3, cu, h0, chunk_size=chunk, segment_size=segment, block=16)
    loss = (o * do).sum() + ((ht * dht).sum() if with_dfinal else 0)
    grads = torch.autograd.grad(loss, [x for x in (q, k, v, h0) if x is not None])
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, h0) if x is not None]
    o64, ht64 = linear_attention_varlen(*leaves[:3], rate.double(), 0.3, cu.cpu(), leaves[3] if with_initial else None)
    loss64 = (o64 * do.double()).sum() + ((ht64 * dht.double()).sum() if with_dfinal else 0)
    refs = torch.autograd.grad(loss64, leaves)
    assert_rel_rms("o", o64, o, FP32_TOL)
    assert_rel_rms("final state", ht64, ht, FP32_TOL)
    for name, ref, got in zip(("dq", "dk", "dv", "dh0"), refs, grads, strict=False):
        assert_rel_rms(name, ref, got, FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[4096], [1000, 1, 0, 3000, 77]], ids=["4K", "ragged"])
@pytest.mark.parametrize("layer", [0, 18])
def test_triton_backward_real_shape_bf16(lengths, layer):
    from common_kernels.ops.linear_attn.backward import linear_attention_varlen_triton

    H, d = 16, 128
    cu = ragged_offsets(lengths).to(DEVICE)
    T, N = int(cu[-1]), len(lengths)
    q, k, v = (x.detach().requires_grad_() for x in fused_qkv(T, H, d, d, torch.bfloat16))
    h0 = (torch.randn(N, H, d, d, device=DEVICE) * 0.1).requires_grad_()
    rate = decay_rates(MINI, layer).to(DEVICE)
    do = torch.randn(T, H, d, device=DEVICE).bfloat16()
    o, ht = linear_attention_varlen_triton(q, k, v, rate, d**-0.5, cu, h0)
    grads = torch.autograd.grad((o.float() * do.float()).sum() + ht.sum(), (q, k, v, h0))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, h0)]
    o64, ht64 = linear_attention_varlen(*leaves[:3], rate.double(), d**-0.5, cu.cpu(), leaves[3])
    refs = torch.autograd.grad((o64 * do.double()).sum() + ht64.sum(), leaves)
    assert_rel_rms("o", o64, o, 3e-3)
    for name, ref, got in zip(("dq", "dk", "dv", "dh0"), refs, grads, strict=False):
        assert_rel_rms(name, ref, got, 3.5e-3)


def test_launch_heuristics_ask_the_device_for_its_sm_count(monkeypatch):
    """The prefill aims for two programs per SM and decode widens its tiles from about two (sequence, head) pairs
    per SM, of the device they run on: asked, not assumed (an H200 has 132)."""
    from types import SimpleNamespace

    from common_kernels.ops.linear_attn import prefill

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=66))
    assert triton_settings.sm_count.__wrapped__(torch.device("cuda", 0)) == 66
    assert prefill.target_programs(torch.device("cpu")) == 2 * triton_settings.CPU_SM_COUNT
    # 32K tokens x 16 heads x 2 V-tiles over 264 programs: 4,096-token segments; over half as many, twice as long
    assert prefill._segment_size(32768, 16, 2, 64, 264) == 4096
    assert prefill._segment_size(32768, 16, 2, 64, 132) == 8192
    from common_kernels.ops.linear_attn import decode

    assert decode.wide_tile_min_rows(torch.device("cpu")) == 256  # the H200 sweep's figure
    monkeypatch.setattr(decode, "sm_count", lambda device: 66)
    assert decode.wide_tile_min_rows(torch.device("cuda", 0)) == 128


ONE_LAUNCH_CASES = [([37, 0, 1, 80, 16], 2, 16, 32, 16), ([0, 0], 2, 16, 16, 16), ([15, 17, 64, 65, 1], 2, 16, 16, 16)]


class NotLaunched:
    def __getitem__(self, grid):
        raise AssertionError("a one-launch plan ran the delta or scan kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths,H,K,V,chunk", ONE_LAUNCH_CASES, ids=[str(c[0]) for c in ONE_LAUNCH_CASES])
def test_a_one_launch_prefill_matches_float64_and_the_three_launches_bit_for_bit(
    lengths, H, K, V, chunk, dtype, monkeypatch
):
    """Short sequences (an engine's mixed step) in the forward kernel alone, each from its pool slot (stale, fresh,
    padded, empty): float64-close, and the same bits as the three launches cutting each into one segment."""
    from common_kernels.ops.linear_attn import prefill

    assert plan_prefill(ragged_offsets(lengths).to(DEVICE), sum(lengths), H, V, max_seqlen=1).one_launch is False
    monkeypatch.setattr(prefill, "ONE_LAUNCH_MAX_TOKENS", max(lengths))
    cu = ragged_offsets(lengths).to(DEVICE)
    T = int(cu[-1])
    q, k, v = fused_qkv(T, H, K, V, dtype)
    rate = rates_for(H, "mixed").to(DEVICE)
    plan = plan_prefill(cu, T, H, V, chunk, block_v=16, max_seqlen=max(lengths))
    assert plan.one_launch and plan.max_segs == len(lengths) and plan.seg >= max(lengths)
    with monkeypatch.context() as patch:
        patch.setattr(prefill, "_segment_delta_kernel", NotLaunched())
        patch.setattr(prefill, "_segment_scan_kernel", NotLaunched())
        check_prefill_on_a_stale_pool(
            lambda pool, slots, fresh: linear_attention_prefill(
                q, k, v, rate, K**-0.5, cu, pool, slots, fresh, chunk_size=chunk, block_v=16, plan=plan
            ),
            q, k, v, rate, K**-0.5, cu, spare=2,
        )  # fmt: skip
    pool = torch.randn(len(lengths) + 1, H, K, V, device=DEVICE)
    slots = torch.arange(len(lengths), device=DEVICE)
    fresh = (torch.arange(len(lengths), device=DEVICE) % 2).to(torch.int8)
    one, three = pool.clone(), pool.clone()
    o1 = linear_attention_prefill(q, k, v, rate, 0.3, cu, one, slots, fresh, chunk_size=chunk, block_v=16, plan=plan)
    o3 = linear_attention_prefill(
        q, k, v, rate, 0.3, cu, three, slots, fresh, chunk_size=chunk, block_v=16, segment_size=plan.seg
    )
    assert torch.equal(o1, o3) and torch.equal(one, three)
