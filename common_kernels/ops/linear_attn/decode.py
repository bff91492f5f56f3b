"""In-place decode of scalar-decay linear attention on an indexed fp32 state pool (Triton).

One program per (sequence, head, V-tile) loads its `[K, BV]` fp32 state tile once, runs the
sequence's `tokens_per_seq` tokens through it in registers (1 for plain decode, 1+k for speculative
verification or short continuations), and stores it back. Rows whose slot is `-1` are padding: the
state pool is not touched and their outputs are zero. No allocation depends on the data and the grid
depends only on the batch size, so one compiled kernel serves every batch size and CUDA graphs can
capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_settings import sm_count
from .triton_utils import check_pool, check_qkv, output_rows

# (sequence, head) pairs per SM from which 64-column V-tiles fill the GPU: 256 pairs on an H200's 132 SMs (sweep)
WIDE_TILE_MIN_ROWS_PER_SM = 256 / 132


def wide_tile_min_rows(device: torch.device) -> int:
    """The (sequence, head) pairs from which decode uses 64-column V-tiles on `device` (16-column below)."""
    return round(WIDE_TILE_MIN_ROWS_PER_SM * sm_count(device))


@triton.jit(do_not_specialize_on_alignment=["slots", "fresh"])
def _decode_kernel(
    q, k, v, o, pool, slots, fresh, rate, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_pp, stride_ph, T_SEQ,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, HAS_FRESH: tl.constexpr,
):  # fmt: skip
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    slot = tl.load(slots + i_b).to(tl.int64)
    row0 = i_b.to(tl.int64) * T_SEQ
    if slot < 0:
        for t in range(0, T_SEQ):
            tl.store(o + (row0 + t) * stride_ot + i_h * stride_oh + o_v, tl.zeros([BV], dtype=o.dtype.element_ty))
        return
    p_s = pool + slot * stride_pp + i_h * stride_ph + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s).to(tl.float32)  # [K, BV]; a bf16 pool is widened, the math stays fp32
    if HAS_FRESH:  # noqa: SIM102 - a compile-time branch around a runtime one
        if tl.load(fresh + i_b) != 0:  # a new sequence: its slot may hold a finished request's state
            b_s = tl.zeros([K, BV], dtype=tl.float32)
    lam = tl.exp(-tl.load(rate + i_h).to(tl.float32))
    for t in range(0, T_SEQ):
        row = row0 + t
        b_q = tl.load(q + row * stride_qt + i_h * stride_qh + o_k).to(tl.float32)
        b_k = tl.load(k + row * stride_kt + i_h * stride_kh + o_k).to(tl.float32)
        b_v = tl.load(v + row * stride_vt + i_h * stride_vh + o_v).to(tl.float32)
        b_s = b_s * lam + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_q[:, None] * b_s, axis=0) * scale
        tl.store(o + row * stride_ot + i_h * stride_oh + o_v, b_o.to(o.dtype.element_ty))
    tl.store(p_s, b_s.to(pool.dtype.element_ty))


def linear_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    tokens_per_seq: int = 1,
    fresh: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
    num_warps: int = 2,
) -> torch.Tensor:
    """Advance B sequences by `tokens_per_seq` tokens each, updating `state_pool` in place.

    Args:
        q, k: `[B * tokens_per_seq, H, K]`; v: `[B * tokens_per_seq, H, V]` (sequence b owns rows
            `b*tokens_per_seq .. (b+1)*tokens_per_seq - 1`), any token/head strides; v may be 16-bit
            beside fp32 q/k.
        decay_rate: `[H]`; scale: multiplies q.
        state_pool: `[P, H, K, V]` fp32 (bf16 accepted on explicit request: rounded once per step, drifts).
        slots: `[B]` int pool indices, `-1` = padded row (pool untouched, output zero).
        fresh: optional `[B]` bool/int, nonzero = start from a zero state instead of the pool's (a
            one-token prompt that an engine schedules as a decode). Default: every row continues.
        out: optional preallocated output `[B * tokens_per_seq, H, V]` (for CUDA graphs).
        block_v, num_warps: V-tile width and warps; by default 16-column tiles while there are few
            (sequence, head) pairs, so small batches still spread over the SMs, else 64 (H200 sweep).

    Returns:
        o `[B * tokens_per_seq, H, V]` in the dtype of q (or `out`).
    """
    T, H, K, V = check_qkv("linear_attention_decode", q, k, v, narrow_v=True)
    check_pool("linear_attention_decode", state_pool, H, K, V)
    if tokens_per_seq < 1 or T % tokens_per_seq:
        raise ValueError(f"linear_attention_decode: {T} rows do not split into sequences of {tokens_per_seq} tokens")
    B = T // tokens_per_seq
    if slots.shape != (B,):
        raise ValueError(f"linear_attention_decode: slots must be [{B}], got {tuple(slots.shape)}")
    if fresh is not None and fresh.shape != (B,):
        raise ValueError(f"linear_attention_decode: fresh must be [{B}], got {tuple(fresh.shape)}")
    o = output_rows("linear_attention_decode", out, q, V)
    min_rows, rows = wide_tile_min_rows(q.device), B * H
    BV = min(block_v or (64 if rows >= min_rows else 16), V)
    if B == 0:
        return o
    _decode_kernel[(B, H, V // BV)](
        q, k, v, o, state_pool, slots, slots if fresh is None else fresh,
        decay_rate.to(device=q.device, dtype=torch.float32).contiguous(), scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        state_pool.stride(0), state_pool.stride(1), tokens_per_seq,
        K, V, BV, fresh is not None, num_warps=num_warps,
    )  # fmt: skip
    return o
