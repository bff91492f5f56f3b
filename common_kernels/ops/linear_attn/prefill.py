"""Varlen prefill of scalar-decay linear attention on an indexed fp32 state pool (Triton).

Each sequence is cut into segments of `SEG` tokens so that even one sequence with few heads fills the GPU.
Because the decay is a scalar per head, segment states combine exactly:
`S(a..c) = lam^len(b..c) * S(a..b) + dS(b..c)`. Three launches, no host synchronisation:

1. `_segment_delta_kernel`: per (segment, head, V-tile), the end state of every non-last segment started
   from zero, `dS = sum_t lam^(SEG-1-t) k_t^T v_t` (reads k and v).
2. `_segment_scan_kernel`: per (sequence, head, V-tile), walks its segments in order from the pool's
   initial state (zero for a fresh sequence) and writes each segment's start state.
3. `_segment_forward_kernel`: per (segment, head, V-tile), the chunked forward from its start state
   (reads q, k, v, writes o); the last segment of a sequence writes the final state into the pool.

A step whose sequences are all short (`max_seqlen <= ONE_LAUNCH_MAX_TOKENS`, an engine's mixed step: decodes
beside a new request's suffix) can skip kernels 1 and 2: each sequence is one segment that kernel 3 starts from
the pool (`plan_prefill`'s one-launch plan). Off by default until timed on a GPU (`RING_LINEAR_ONE_LAUNCH_MAX_TOKENS`).

Inside a chunk of `BT` tokens only non-negative powers of `lam` appear (no inverse-decay factors).
q/k/v may be strided views of the fused QKV output. The running state stays fp32; every matrix product
takes operands in the input dtype with fp32 accumulation, so for bf16 inputs the state enters `q S` as a
bf16 copy (rounded once per chunk, never carried), as fla's chunk kernels do.

The batch-dependent integers (sequence count, segment length) are arguments Triton does not specialise on,
nor the alignment of the per-sequence slot and flag arrays (an engine passes slices of its own), so one
compiled variant of each kernel serves every batch: an engine compiles them once, at start-up
(`common_kernels.serving.warmup`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..triton_settings import INTERPRET, dot_precision, sm_count
from .triton_utils import (
    check_pool,
    check_qkv,
    chunk_decays,
    chunk_state_update,
    output_rows,
    segment_grid,
    segment_program,
)

CHUNK = 64
# the longest sequence a one-launch plan takes (0: never); a setting to time, read when a plan is made
ONE_LAUNCH_MAX_TOKENS = int(os.environ.get("RING_LINEAR_ONE_LAUNCH_MAX_TOKENS", "0"))
PROGRAMS_PER_SM = 2  # the best of the sweep on an H200 (RESULTS.md)


def target_programs(device: torch.device) -> int:
    """How many segment programs a prefill aims for on `device`: `PROGRAMS_PER_SM` per SM it reports."""
    return PROGRAMS_PER_SM * sm_count(device)


SCAN_BLOCK = 2048  # state elements per scan program: 8 KB fp32, 8 per 128 x 128 state (timed only as part of run F)


def scan_launch(N: int, H: int, K: int, V: int) -> tuple[tuple[int, int, int], int]:
    """Grid and block size (BE) of the forward and backward scans: (sequence, head, block of the [K, V] state)."""
    block = min(K * V, SCAN_BLOCK)
    return (N, H, K * V // block), block


@triton.jit(do_not_specialize=["N", "SEG"])
def _segment_delta_kernel(
    k, v, delta, cu_seqlens, seg_seq, seg_idx, nseg, rate,
    stride_kt, stride_kh, stride_vt, stride_vh,
    N, SEG, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, F32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    i_s, i_v, i_h, i_n, i_j, bos, eos, b_rate = segment_program(seg_seq, seg_idx, cu_seqlens, rate, N, SEG, V // BV)
    if i_n >= N:
        return
    if i_j == tl.load(nseg + i_n) - 1:  # the last segment's end state is the final state: kernel 3 writes it
        return
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    b_s = tl.zeros([K, BV], dtype=tl.float32)
    k_decay = tl.exp(-b_rate * (BT - 1 - o_t).to(tl.float32))  # [BT]
    chunk_decay = tl.exp(-b_rate * BT)
    for c in range(0, SEG // BT):
        rows = bos + c * BT + o_t
        b_k = tl.load(k + rows[:, None] * stride_kt + i_h * stride_kh + o_k[None, :])
        b_v = tl.load(v + rows[:, None] * stride_vt + i_h * stride_vh + o_v[None, :]).to(k.dtype.element_ty)
        if F32_DOT:
            b_k, b_v = b_k.to(tl.float32), b_v.to(tl.float32)
        b_kd = (b_k * k_decay[:, None]).to(b_v.dtype)
        b_s = b_s * chunk_decay + tl.dot(tl.trans(b_kd), b_v, input_precision=DOT_PRECISION)
    tl.store(delta + ((i_s * H + i_h) * K + o_k[:, None]).to(tl.int64) * V + o_v[None, :], b_s)


@triton.jit(do_not_specialize=["SEG"], do_not_specialize_on_alignment=["slots", "fresh"])
def _segment_scan_kernel(
    pool, start, delta, slots, fresh, nseg, seg_first, rate, cu_seqlens,
    stride_pp, stride_ph, SEG,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    """Per (sequence, head, block of BE state elements): the scan is elementwise over the [K, V] state, so it
    splits into as many programs as fill the GPU; each walks its sequence's segments in order."""
    i_n, i_h, i_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_e = i_e * BE + tl.arange(0, BE)  # flat offsets into one contiguous [K, V] state
    slot = tl.load(slots + i_n).to(tl.int64)
    p_pool = pool + slot * stride_pp + i_h * stride_ph + o_e
    b_s = tl.zeros([BE], dtype=tl.float32)
    if (slot >= 0) and (tl.load(fresh + i_n) == 0):
        b_s = tl.load(p_pool).to(tl.float32)
    n_seg = tl.load(nseg + i_n)
    if (n_seg == 0) and (slot >= 0):  # an empty sequence hands back its (possibly fresh) initial state
        tl.store(p_pool, b_s.to(pool.dtype.element_ty))
    b_rate = tl.load(rate + i_h).to(tl.float32)
    length = tl.load(cu_seqlens + i_n + 1) - tl.load(cu_seqlens + i_n)
    first = tl.load(seg_first + i_n)
    offset = (first * H + i_h).to(tl.int64) * (K * V) + o_e  # int64: advances by H * K * V per segment
    # one delta ahead, so each load's latency overlaps the previous segment's store; the last segment's delta
    # slot is never written (kernel 3 produces its end state), so its load is masked off
    n_deltas = n_seg - 1
    b_next = tl.load(delta + offset, mask=n_deltas > 0, other=0.0)
    for j in range(0, n_seg):
        b_delta = b_next
        b_next = tl.load(delta + offset + H * K * V, mask=j + 1 < n_deltas, other=0.0)
        tl.store(start + offset, b_s)
        b_s = b_s * tl.exp(-b_rate * tl.minimum(SEG, length - j * SEG).to(tl.float32)) + b_delta
        offset += H * K * V


@triton.jit(do_not_specialize=["N", "SEG"], do_not_specialize_on_alignment=["slots", "fresh"])
def _segment_forward_kernel(
    q, k, v, o, pool, start, cu_seqlens, seg_seq, seg_idx, nseg, slots, fresh, rate, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_pp, stride_ph,
    N, SEG, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, F32_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_LAUNCH: tl.constexpr,
):  # fmt: skip
    """ONE_LAUNCH: every sequence is one segment (`plan_prefill`'s one-launch plan, empty ones included): the
    program starts from the pool (or zero) and writes the final state, with no delta or scan launch before it."""
    i_s, i_v, i_h, i_n, i_j, bos, eos, b_rate = segment_program(seg_seq, seg_idx, cu_seqlens, rate, N, SEG, V // BV)
    if i_n >= N:
        return
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t, q_decay, intra = chunk_decays(b_rate, BT)
    if ONE_LAUNCH:
        slot = tl.load(slots + i_n).to(tl.int64)
        b_s = tl.zeros([K, BV], dtype=tl.float32)
        if (slot >= 0) and (tl.load(fresh + i_n) == 0):
            b_s = tl.load(pool + slot * stride_pp + i_h * stride_ph + o_k[:, None] * V + o_v[None, :]).to(tl.float32)
    else:
        state_offset = ((i_s * H + i_h) * K + o_k[:, None]).to(tl.int64) * V + o_v[None, :]
        b_s = tl.load(start + state_offset)  # [K, BV] fp32
    for t0 in range(bos, eos, BT):
        rows = t0 + o_t
        m_t = rows < eos
        b_q = tl.load(q + rows[:, None] * stride_qt + i_h * stride_qh + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_k = tl.load(k + rows[:, None] * stride_kt + i_h * stride_kh + o_k[None, :], mask=m_t[:, None], other=0.0)
        b_v = tl.load(v + rows[:, None] * stride_vt + i_h * stride_vh + o_v[None, :], mask=m_t[:, None], other=0.0)
        b_v = b_v.to(q.dtype.element_ty)  # a 16-bit v beside fp32 q/k widens exactly, as a cast before the call
        if F32_DOT:
            b_q, b_k, b_v = b_q.to(tl.float32), b_k.to(tl.float32), b_v.to(tl.float32)
        b_a = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * intra  # [BT, BT]
        b_o = (
            tl.dot(b_a.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
            + tl.dot(b_q, b_s.to(b_q.dtype), input_precision=DOT_PRECISION) * q_decay[:, None]
        )
        p_o = o + rows[:, None] * stride_ot + i_h * stride_oh + o_v[None, :]
        tl.store(p_o, (b_o * scale).to(o.dtype.element_ty), mask=m_t[:, None])
        c = tl.minimum(eos - t0, BT).to(tl.float32)
        b_s = chunk_state_update(b_s, b_k, b_v, m_t, c, b_rate, o_t, DOT_PRECISION)
    if not ONE_LAUNCH:  # (the slot is read here, after the loop, so it is not kept live through it)
        slot = tl.load(slots + i_n).to(tl.int64)
    p_pool = pool + slot * stride_pp + i_h * stride_ph + o_k[:, None] * V + o_v[None, :]
    if ONE_LAUNCH:
        if slot >= 0:
            tl.store(p_pool, b_s.to(pool.dtype.element_ty))
    elif (i_j == tl.load(nseg + i_n) - 1) and (slot >= 0):  # the final state: the last segment's program
        tl.store(p_pool, b_s.to(pool.dtype.element_ty))


def _segment_size(T: int, H: int, NV: int, chunk: int, programs: int) -> int:
    """Segment length (a power of two, >= chunk) giving about `programs` programs."""
    want = max(chunk, -(-T * H * NV // programs))
    return max(chunk, 1 << (want - 1).bit_length())


def linear_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor | None = None,
    chunk_size: int = CHUNK,
    segment_size: int | None = None,
    block_v: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    max_seqlen: int | None = None,
    plan: SegmentPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill packed sequences, reading and writing their states in `state_pool` in place.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`, bf16/fp16/fp32 (v may be 16-bit beside fp32 q/k), any
            token/head strides (unit last stride).
        decay_rate: `[H]`, per-token decay `exp(-decay_rate)`.
        scale: multiplies q.
        cu_seqlens: `[N+1]` int offsets on the device (read on the device only).
        state_pool: `[P, H, K, V]` fp32 (bf16 accepted on explicit request); sequence n starts from
            `state_pool[slots[n]]` and its final state is written back there.
        slots: `[N]` int pool indices; `-1` runs the sequence from a zero state and stores nothing.
        fresh: `[N]` bool/int, nonzero = start from zero instead of reading the pool (a new request whose
            slot holds stale memory). Default: all fresh.
        chunk_size, segment_size, block_v, num_warps, num_stages: tiling and launch settings; the
            defaults are the best of a sweep on an H200 (benchmarks/RESULTS.md). One config of the
            sweep (chunk 64, block_v 32, 4 warps, 1 stage) faulted with an illegal address in Triton
            3.6 on an H200; it is not used.
        max_seqlen: the longest sequence, when the caller knows it on the host (engines do). When it
            holds more than half of all tokens, segments are sized for it alone, so one long sequence
            among short ones still spreads over the GPU; otherwise for the total.
        plan: the batch's segment tables from `plan_prefill`, when the caller runs several layers over the
            same batch (an engine step): built once instead of in every layer. It replaces segment_size
            and max_seqlen.
        out: optional output `[T, H, V]` (unit last stride) to write into, e.g. rows of an engine's buffer.

    Returns:
        o `[T, H, V]` in the dtype of q (or `out`).
    """
    T, H, K, V = check_qkv("linear_attention_prefill", q, k, v, narrow_v=True)
    check_pool("linear_attention_prefill", state_pool, H, K, V)
    N = cu_seqlens.numel() - 1
    if slots.shape != (N,):
        raise ValueError(f"linear_attention_prefill: slots must be [{N}] (one per sequence), got {tuple(slots.shape)}")
    if fresh is None:
        fresh = torch.ones(N, dtype=torch.int8, device=q.device)
    elif fresh.shape != (N,):
        raise ValueError(f"linear_attention_prefill: fresh must be [{N}], got {tuple(fresh.shape)}")
    out = output_rows("linear_attention_prefill", out, q, V)
    if N == 0:
        return out
    if plan is None:
        plan = plan_prefill(cu_seqlens, T, H, V, chunk_size, block_v, segment_size, max_seqlen)
    elif plan.total_tokens != T:
        raise ValueError(f"linear_attention_prefill: the plan was made for {plan.total_tokens} tokens, q has {T}")
    BV, BT = _block_v(V, block_v), chunk_size
    _check_segment(plan.seg, BT)
    _forward(q, k, v, decay_rate, scale, cu_seqlens, state_pool, slots, fresh, plan, BT, BV, num_warps, num_stages, out)
    return out


def _block_v(V: int, block_v: int | None) -> int:
    return block_v or min(V, 64)


def _check_segment(seg: int, chunk: int) -> None:
    if seg % chunk or chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"segment_size {seg} must be a multiple of chunk_size {chunk} (a power of two >= 16)")


def plan_prefill(
    cu_seqlens: torch.Tensor,
    total_tokens: int,
    num_heads: int,
    head_dim_v: int,
    chunk_size: int = CHUNK,
    block_v: int | None = None,
    segment_size: int | None = None,
    max_seqlen: int | None = None,
) -> SegmentPlan:
    """The segment tables `linear_attention_prefill` would build for this batch (same arguments), so that an
    engine step builds them once for all its linear layers; about ten small device ops, no host sync."""
    if segment_size is None and max_seqlen is not None and max_seqlen <= ONE_LAUNCH_MAX_TOKENS:
        return one_launch_plan(cu_seqlens, total_tokens, max(chunk_size, 1 << max(max_seqlen - 1, 0).bit_length()))
    NV = head_dim_v // _block_v(head_dim_v, block_v)
    dominant = max_seqlen is not None and 2 * max_seqlen > total_tokens
    programs = target_programs(cu_seqlens.device)
    seg = segment_size or _segment_size(max_seqlen if dominant else total_tokens, num_heads, NV, chunk_size, programs)
    _check_segment(seg, chunk_size)
    return plan_segments(cu_seqlens, total_tokens, seg)


@dataclass
class SegmentPlan:
    """Device tables mapping each program slot to (sequence, segment); built without host syncs."""

    seg: int  # segment length in tokens
    total_tokens: int  # the packed length the tables were made for
    max_segs: int  # program slots; those past the real segments exit at once
    nseg: torch.Tensor  # [N] int32 segments per sequence
    seg_first: torch.Tensor  # [N] int32 index of each sequence's first segment
    seg_seq: torch.Tensor  # [max_segs] int32 sequence of each slot (N = unused)
    seg_idx: torch.Tensor  # [max_segs] int32 segment index within its sequence
    one_launch: bool = False  # one segment per sequence, empty ones too: the forward alone (`one_launch_plan`)


def one_launch_plan(cu_seqlens: torch.Tensor, total_tokens: int, seg: int) -> SegmentPlan:
    """Program slot n = sequence n, whose tokens all fit in one `seg`-token segment (the caller knows they do)."""
    N = cu_seqlens.numel() - 1
    index = torch.arange(N, dtype=torch.int32, device=cu_seqlens.device)
    ones = torch.ones_like(index)
    return SegmentPlan(seg, total_tokens, N, ones, index, index, torch.zeros_like(index), one_launch=True)


def plan_segments(cu_seqlens: torch.Tensor, total_tokens: int, seg: int) -> SegmentPlan:
    N = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    nseg = ((lengths + seg - 1) // seg).to(torch.int32)
    seg_end = torch.cumsum(nseg, 0)
    seg_first = (seg_end - nseg).to(torch.int32)
    max_segs = total_tokens // seg + N  # each sequence adds at most one partial segment
    seg_ids = torch.arange(max_segs, device=cu_seqlens.device)
    seg_seq = torch.searchsorted(seg_end, seg_ids, right=True).to(torch.int32)
    seg_idx = (seg_ids - seg_first[seg_seq.clamp(max=N - 1).long()]).to(torch.int32)
    return SegmentPlan(seg, total_tokens, max_segs, nseg, seg_first, seg_seq, seg_idx)


def _forward(
    q, k, v, decay_rate, scale, cu_seqlens, state_pool, slots, fresh, plan, BT, BV, num_warps, num_stages, o=None
):
    """The three launches (one for a one-launch plan); returns o and every segment's start state
    `[max_segs, H, K, V]` (for backward; None for a one-launch plan, which backward never makes)."""
    T, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    NV, SEG, max_segs = V // BV, plan.seg, plan.max_segs
    if o is None:
        o = torch.empty((T, H, V), dtype=q.dtype, device=q.device)
    rate = decay_rate.to(device=q.device, dtype=torch.float32).contiguous()
    if plan.one_launch:
        _launch_forward(q, k, v, o, state_pool, o, cu_seqlens, plan, slots, fresh, rate, scale, BT, BV, num_warps,
                        num_stages)  # fmt: skip
        return o, None
    start = torch.empty((max_segs, H, K, V), dtype=torch.float32, device=q.device)
    delta = torch.empty_like(start)
    _segment_delta_kernel[segment_grid(max_segs, H, NV)](
        k, v, delta, cu_seqlens, plan.seg_seq, plan.seg_idx, plan.nseg, rate,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        N, SEG, H, K, V, BT, BV, INTERPRET, dot_precision(q), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    scan_grid, BE = scan_launch(N, H, K, V)
    _segment_scan_kernel[scan_grid](
        state_pool, start, delta, slots, fresh, plan.nseg, plan.seg_first, rate, cu_seqlens,
        state_pool.stride(0), state_pool.stride(1), SEG,
        H, K, V, BE, num_warps=4,
    )  # fmt: skip
    _launch_forward(q, k, v, o, state_pool, start, cu_seqlens, plan, slots, fresh, rate, scale, BT, BV, num_warps,
                    num_stages)  # fmt: skip
    return o, start


def _launch_forward(q, k, v, o, state_pool, start, cu_seqlens, plan, slots, fresh, rate, scale, BT, BV, num_warps,
                    num_stages):  # fmt: skip
    T, H, K = q.shape
    V, N = v.shape[-1], cu_seqlens.numel() - 1
    _segment_forward_kernel[segment_grid(plan.max_segs, H, V // BV)](
        q, k, v, o, state_pool, start, cu_seqlens, plan.seg_seq, plan.seg_idx, plan.nseg, slots, fresh, rate, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        state_pool.stride(0), state_pool.stride(1),
        N, plan.seg, H, K, V, BT, BV, INTERPRET, dot_precision(q), plan.one_launch,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
