"""Backward of the varlen prefill (Triton) and the differentiable `linear_attention_varlen_triton`.

With `G_t = dL/dS_t` (the recurrence run backwards, `G_t = scale q_t^T do_t + lam G_{t+1}`), inside a chunk
of length `c` with start state `S0`, the gradient `Gf` flowing into the chunk's last state from later
chunks, `M_ij = lam^(i-j)` for `i >= j`, `A = (Q K^T) * M` and `P = (dO V^T) * M`:

    dQ = scale * (P K + diag(lam^(i+1)) dO S0^T)
    dK = scale * P^T Q + diag(lam^(c-1-i)) V Gf^T
    dV = scale * A^T dO + diag(lam^(c-1-i)) K Gf
    G before the chunk = lam^c Gf + scale * (diag(lam^(i+1)) Q)^T dO

The segments of the forward are reused: per-segment `dG` (kernel 1), a reverse scan that hands each
segment the gradient of its last state (kernel 2), then dq walking forward over K-tiles from the saved
start states (kernel 3), dk walking backward over K-tiles (kernel 4, which also yields the gradient of
each sequence's initial state) and dv walking backward over V-tiles (kernel 5). Every program owns whole
rows of its output tile, so there are no atomics and no partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_settings import INTERPRET, dot_precision
from .prefill import CHUNK, SegmentPlan, _forward, plan_prefill, scan_launch
from .triton_utils import check_qkv, chunk_decays, chunk_state_update, segment_grid, segment_program


@triton.jit
def _segment_dstate_kernel(
    q, do, dstate, cu_seqlens, seg_seq, seg_idx, rate, scale,
    stride_qt, stride_qh, stride_dot, stride_doh,
    N, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, SEG: tl.constexpr, F32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dG = scale * sum_i lam^(i+1) q_i^T do_i over a segment (i from its start); not for first segments."""
    i_s, i_v, i_h, i_n, i_j, bos, eos, b_rate = segment_program(seg_seq, seg_idx, cu_seqlens, rate, N, SEG, V // BV)
    if (i_n >= N) or (i_j == 0):  # a first segment's gradient only feeds the initial state: kernel 4 produces it
        return
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    b_g = tl.zeros([K, BV], dtype=tl.float32)
    for t0 in range(bos, eos, BT):
        rows = t0 + o_t
        m_t = rows < eos
        b_q = tl.load(q + rows[:, None] * stride_qt + i_h * stride_qh + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_do = tl.load(do + rows[:, None] * stride_dot + i_h * stride_doh + o_v[None, :], mask=m_t[:, None], other=0.0)
        if F32_DOT:
            b_q, b_do = b_q.to(tl.float32), b_do.to(tl.float32)
        w = tl.exp(-b_rate * (t0 - bos + o_t + 1).to(tl.float32))
        b_g += tl.dot(tl.trans((b_q * w[:, None]).to(b_do.dtype)), b_do, input_precision=DOT_PRECISION)
    tl.store(dstate + ((i_s * H + i_h) * K + o_k[:, None]).to(tl.int64) * V + o_v[None, :], b_g * scale)


@triton.jit
def _segment_dscan_kernel(
    gfut, dstate, d_final, d_initial, cu_seqlens, nseg, seg_first, rate,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BE: tl.constexpr, SEG: tl.constexpr, HAS_DFINAL: tl.constexpr,
):  # fmt: skip
    """Walk a sequence's segments backwards: each gets the gradient flowing into its last state. Elementwise over
    the [K, V] gradient, so split into blocks of BE elements like the forward scan."""
    i_n, i_h, i_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_e = i_e * BE + tl.arange(0, BE)
    state = (i_n * H + i_h).to(tl.int64) * (K * V) + o_e
    b_g = tl.zeros([BE], dtype=tl.float32)
    if HAS_DFINAL:
        b_g = tl.load(d_final + state)
    n_seg = tl.load(nseg + i_n)
    if n_seg == 0:  # an empty sequence passes the final-state gradient straight to its initial state
        tl.store(d_initial + state, b_g)
    length = tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)
    b_rate = tl.load(rate + i_h).to(tl.float32)
    first = tl.load(seg_first + i_n)
    offset = ((first + n_seg - 1) * H + i_h).to(tl.int64) * (K * V) + o_e  # the last segment; steps back by H*K*V
    # one dG ahead, as in the forward scan; first segments have none (kernel 1 skips them): masked off
    b_next = tl.load(dstate + offset, mask=n_seg > 1, other=0.0)
    for jj in range(0, n_seg):
        j = n_seg - 1 - jj
        b_dstate = b_next
        b_next = tl.load(dstate + offset - H * K * V, mask=j > 1, other=0.0)
        tl.store(gfut + offset, b_g)
        seg_len = tl.minimum(length - j * SEG, SEG).to(tl.float32)
        b_g = b_g * tl.exp(-b_rate * seg_len) + b_dstate  # unused after segment 0
        offset -= H * K * V


@triton.jit
def _segment_dq_kernel(
    k, v, do, dq, start, cu_seqlens, seg_seq, seg_idx, rate, scale,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    N, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, SEG: tl.constexpr, F32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    i_s, i_k, i_h, i_n, i_j, bos, eos, b_rate = segment_program(seg_seq, seg_idx, cu_seqlens, rate, N, SEG, K // BK)
    if i_n >= N:
        return
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, V)
    o_t, q_decay, intra = chunk_decays(b_rate, BT)
    b_s = tl.load(start + ((i_s * H + i_h) * K + o_k[:, None]).to(tl.int64) * V + o_v[None, :])  # [BK, V]
    for t0 in range(bos, eos, BT):
        rows = t0 + o_t
        m_t = rows < eos
        b_k = tl.load(k + rows[:, None] * stride_kt + i_h * stride_kh + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_v = tl.load(v + rows[:, None] * stride_vt + i_h * stride_vh + o_v[None, :], mask=m_t[:, None], other=0.0)
        b_do = tl.load(do + rows[:, None] * stride_dot + i_h * stride_doh + o_v[None, :], mask=m_t[:, None], other=0.0)
        if F32_DOT:
            b_k, b_v, b_do = b_k.to(tl.float32), b_v.to(tl.float32), b_do.to(tl.float32)
        b_p = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION) * intra  # [BT, BT]
        b_dq = (
            tl.dot(b_p.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
            + tl.dot(b_do, tl.trans(b_s.to(b_do.dtype)), input_precision=DOT_PRECISION) * q_decay[:, None]
        )
        p_dq = dq + rows[:, None] * stride_dqt + i_h * stride_dqh + o_k[None, :]
        tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=m_t[:, None])
        c = tl.minimum(eos - t0, BT).to(tl.float32)
        b_s = chunk_state_update(b_s, b_k, b_v, m_t, c, b_rate, o_t, DOT_PRECISION)


@triton.jit
def _segment_dkv_kernel(
    q, k, v, do, dout, gfut, d_initial, cu_seqlens, seg_seq, seg_idx, rate, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_outt, stride_outh,
    N, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SEG: tl.constexpr,
    DK: tl.constexpr, F32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk (DK: tiles of K rows, full V) or dv (tiles of V columns, full K), walking the chunks backwards."""
    tiles = (K // BK) * (V // BV)  # one of the two is 1
    i_s, i_t, i_h, i_n, i_j, bos, eos, b_rate = segment_program(seg_seq, seg_idx, cu_seqlens, rate, N, SEG, tiles)
    if i_n >= N:
        return
    o_k = (i_t * BK if DK else 0) + tl.arange(0, BK)  # the rows of G this program holds
    o_v = (0 if DK else i_t * BV) + tl.arange(0, BV)  # its columns
    o_t, q_decay, intra = chunk_decays(b_rate, BT)  # intra: [query t, key j]
    state = ((i_s * H + i_h) * K + o_k[:, None]).to(tl.int64) * V + o_v[None, :]
    b_g = tl.load(gfut + state)  # [BK, BV]
    n_chunks = tl.cdiv(eos - bos, BT)
    for cc in range(0, n_chunks):
        t0 = bos + (n_chunks - 1 - cc) * BT
        rows = t0 + o_t
        m_t = rows < eos
        c = tl.minimum(eos - t0, BT).to(tl.float32)
        k_decay = tl.where(m_t, tl.exp(-b_rate * tl.maximum(c - 1 - o_t.to(tl.float32), 0.0)), 0.0)
        b_q = tl.load(q + rows[:, None] * stride_qt + i_h * stride_qh + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_do = tl.load(do + rows[:, None] * stride_dot + i_h * stride_doh + o_v[None, :], mask=m_t[:, None], other=0.0)
        if DK:  # dk = scale * P^T Q + diag(k_decay) V G^T, with P = (dO V^T) * M over the full V
            b_v = tl.load(v + rows[:, None] * stride_vt + i_h * stride_vh + o_v[None, :], mask=m_t[:, None], other=0.0)
            if F32_DOT:
                b_q, b_do, b_v = b_q.to(tl.float32), b_do.to(tl.float32), b_v.to(tl.float32)
            b_p = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION) * intra
            b_out = tl.dot(tl.trans(b_p).to(b_q.dtype), b_q, input_precision=DOT_PRECISION) * scale
            b_out += tl.dot(b_v, tl.trans(b_g.to(b_v.dtype)), input_precision=DOT_PRECISION) * k_decay[:, None]
            p_out = dout + rows[:, None] * stride_outt + i_h * stride_outh + o_k[None, :]
        else:  # dv = scale * A^T dO + diag(k_decay) K G, with A = (Q K^T) * M over the full K
            b_k = tl.load(k + rows[:, None] * stride_kt + i_h * stride_kh + o_k[None, :], mask=m_t[:, None], other=0.0)
            if F32_DOT:
                b_q, b_do, b_k = b_q.to(tl.float32), b_do.to(tl.float32), b_k.to(tl.float32)
            b_a = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * intra
            b_out = tl.dot(tl.trans(b_a).to(b_do.dtype), b_do, input_precision=DOT_PRECISION) * scale
            b_out += tl.dot(b_k, b_g.to(b_k.dtype), input_precision=DOT_PRECISION) * k_decay[:, None]
            p_out = dout + rows[:, None] * stride_outt + i_h * stride_outh + o_v[None, :]
        tl.store(p_out, b_out.to(dout.dtype.element_ty), mask=m_t[:, None])
        b_qd = (b_q * (q_decay * scale)[:, None]).to(b_do.dtype)
        b_g = b_g * tl.exp(-b_rate * c) + tl.dot(tl.trans(b_qd), b_do, input_precision=DOT_PRECISION)
    if DK and (i_j == 0):
        tl.store(d_initial + ((i_n * H + i_h) * K + o_k[:, None]).to(tl.int64) * V + o_v[None, :], b_g)


def _backward(do, q, k, v, rate, scale, cu_seqlens, start, plan: SegmentPlan, d_final, BT, BV, BK, num_warps):
    T, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    SEG, max_segs = plan.seg, plan.max_segs
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dstate = torch.empty((max_segs, H, K, V), dtype=torch.float32, device=q.device)
    gfut = torch.empty_like(dstate)
    d_initial = torch.empty((N, H, K, V), dtype=torch.float32, device=q.device)
    d_final_arg = d_initial if d_final is None else d_final.float().contiguous()
    _segment_dstate_kernel[segment_grid(max_segs, H, V // BV)](
        q, do, dstate, cu_seqlens, plan.seg_seq, plan.seg_idx, rate, scale,
        q.stride(0), q.stride(1), do.stride(0), do.stride(1),
        N, H, K, V, BT, BV, SEG, INTERPRET, dot_precision(q), num_warps=num_warps,
    )  # fmt: skip
    scan_grid, BE = scan_launch(N, H, K, V)
    _segment_dscan_kernel[scan_grid](
        gfut, dstate, d_final_arg, d_initial, cu_seqlens, plan.nseg, plan.seg_first, rate,
        H, K, V, BE, SEG, d_final is not None, num_warps=4,
    )  # fmt: skip
    _segment_dq_kernel[segment_grid(max_segs, H, K // BK)](
        k, v, do, dq, start, cu_seqlens, plan.seg_seq, plan.seg_idx, rate, scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        N, H, K, V, BT, BK, SEG, INTERPRET, dot_precision(q), num_warps=num_warps,
    )  # fmt: skip
    for out, is_dk, tiles in ((dk, True, K // BK), (dv, False, V // BV)):
        _segment_dkv_kernel[segment_grid(max_segs, H, tiles)](
            q, k, v, do, out, gfut, d_initial, cu_seqlens, plan.seg_seq, plan.seg_idx, rate, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            out.stride(0), out.stride(1),
            N, H, K, V, BT, BK if is_dk else K, V if is_dk else BV, SEG, is_dk, INTERPRET, dot_precision(q),
            num_warps=num_warps,
        )  # fmt: skip
    return dq, dk, dv, d_initial


class LinearAttentionFunction(torch.autograd.Function):
    """Triton forward and backward of packed-sequence linear attention with explicit initial/final states."""

    @staticmethod
    def forward(ctx, q, k, v, decay_rate, scale, cu_seqlens, initial_states, chunk_size, segment_size, block):
        T, H, K, V = check_qkv("linear_attention_varlen_triton", q, k, v)
        N = cu_seqlens.numel() - 1
        if initial_states is not None and tuple(initial_states.shape) != (N, H, K, V):
            raise ValueError(f"initial_states must be [{N}, {H}, {K}, {V}], got {tuple(initial_states.shape)}")
        pool = (
            torch.zeros((N, H, K, V), dtype=torch.float32, device=q.device)
            if initial_states is None
            else initial_states.detach().float().clone()
        )
        slots = torch.arange(N, dtype=torch.int32, device=q.device)
        fresh = torch.full((N,), int(initial_states is None), dtype=torch.int8, device=q.device)
        BV = min(block, V)
        plan = plan_prefill(cu_seqlens, T, H, V, chunk_size, BV, segment_size)
        rate = decay_rate.to(device=q.device, dtype=torch.float32).contiguous()
        o, start = _forward(q, k, v, rate, scale, cu_seqlens, pool, slots, fresh, plan, chunk_size, BV, 4, 2)
        ctx.save_for_backward(q, k, v, rate, cu_seqlens, start)
        ctx.plan, ctx.scale, ctx.chunk, ctx.block = plan, scale, chunk_size, block
        ctx.has_initial = initial_states is not None
        return o, pool

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, rate, cu_seqlens, start = ctx.saved_tensors
        K, V = q.shape[-1], v.shape[-1]
        if do is None:  # only the final states were used
            do = torch.zeros_like(v)
        dq, dk, dv, d_initial = _backward(
            do.contiguous(), q, k, v, rate, ctx.scale, cu_seqlens, start, ctx.plan, d_final,
            ctx.chunk, min(ctx.block, V), min(ctx.block, K), 4,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, d_initial if ctx.has_initial else None, None, None, None


def linear_attention_varlen_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor,
    initial_states: torch.Tensor | None = None,
    chunk_size: int = CHUNK,
    segment_size: int | None = None,
    block: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Triton counterpart of `naive.linear_attention_varlen` (same arguments and results).

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]` (bf16/fp16/fp32; gradients come back in the same dtype).
        decay_rate: `[H]`; scale: multiplies q; cu_seqlens: `[N+1]` device offsets.
        initial_states: `[N, H, K, V]` or None (zeros); differentiable.

    Returns:
        o `[T, H, V]` in the dtype of q, final states `[N, H, K, V]` fp32 (differentiable).
    """
    return LinearAttentionFunction.apply(
        q, k, v, decay_rate, scale, cu_seqlens, initial_states, chunk_size, segment_size, block
    )
