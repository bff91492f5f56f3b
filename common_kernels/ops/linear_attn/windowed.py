"""Linear attention in windows of `WINDOW` tokens on a grid of absolute positions, beside the token-by-token
`aligned` kernel (same contract plus each sequence's start position and a window buffer): a token's bits still
depend on nothing but its sequence, and a long prompt runs `WINDOW` tokens per step instead of one.

The state of a sequence is the fp32 state `S` at the last multiple of `WINDOW` it has passed and the keys and values
of the tokens since (the window buffer). Every token's output is the chunked form of its window, `lam^(i+1) q S +
sum_{j <= i} lam^(i-j) (q . k_j) v_j` over the window's rows, computed on the same tiles (its `OUTPUT_ROWS`-row
block of queries against the whole window's keys and values) whether the window's other tokens arrived in this call
(a prefill), in earlier calls (decode steps, a prefill split anywhere) or not yet: a row's products never involve
another row's query, and a key or value not yet seen is a zero that the causal mask multiplies by zero. A window is
folded into `S` (`lam^C S + sum_j lam^(C-1-j) k_j^T v_j`) by the call that holds its last token, from the same tile
in every case. A prefill runs in passes: the state chain window after window (the state entering each window kept),
then every window's outputs at once from its kept state, then the buffer; a decode step does all three for its token
in one kernel. So one sequence gives the same bits prefilled in one call, split at any token, or decoded one token
a step; and an engine's prefix cache, which stores states at block boundaries (multiples of `WINDOW`), resumes with
an empty buffer.

Aligned mode runs it in both engines (the buffer beside the state: `serving.window_buffer_shapes`) and in the shim
(`linear_attention_as_served`). Its fp32 products follow `RING_LINEAR_FP32_DOT` (`ops.triton_settings`), as every
kernel's do: TF32 by default, `tf32x3` for fp32 accuracy; engine and shim read the same setting.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..triton_settings import dot_precision
from .backward import linear_attention_varlen_triton
from .triton_utils import block_decays, check_pool, check_qkv, check_sequences, chunk_state_update, output_rows

WINDOW = 64  # the grid: a divisor of every engine block size that can cache a state (vLLM's 512-token blocks)
WINDOWED_BLOCK_V = 32
# A window's outputs are computed this many rows at a time, in a prefill and a decode alike: a decode's one token
# then pays for 16 rows of products, not the window's 64.
OUTPUT_ROWS = 16
# One stage: the window's tiles pipelined over three stages need 296 KiB of shared memory, past Hopper's 227 KiB.
# No multiply-add contraction: the prefill and decode kernels make the same products, and whether the compiler fuses
# a product into the next add (or into tf32x3's remainder `x - tf32(x)`) depends on the kernel around it, so
# contraction would give the two kernels different bits. At TF32 nothing is contracted either way (the same SASS).
WINDOWED_LAUNCH = {"num_warps": 4, "num_stages": 1, "enable_fp_fusion": False}
# 4 warps, as the prefill: the same MMA layout and bits
WINDOWED_DECODE_LAUNCH = {"num_warps": 4, "num_stages": 1, "enable_fp_fusion": False}
# V-tiles a decode program takes one after another (sharing the keys' products): 1 runs one program per tile, as
# the prefill does; any count gives the same bits (each tile's products are the prefill's)
WINDOWED_DECODE_TILES = 1


@triton.jit
def _window_rows(k, v, window_k, window_v, slot, i_h, bos, position, end, base, o_k, o_v, o_t,
                 stride_kt, stride_kh, stride_vt, stride_vh, stride_wkp, stride_wkh, stride_wvp, stride_wvh,
                 K: tl.constexpr, V: tl.constexpr):  # fmt: skip
    """The keys `[C, K]` and values `[C, BV]` of the window at `base` as fp32: rows before `position` from the
    buffer, this call's rows (`position` to `end`) from k/v, zeros after. Also returns the mask of this call's rows."""
    at = base + o_t  # the window's absolute positions
    buffered = at < position
    new = (at >= position) & (at < end)
    rows = bos + (at - position)
    p_wk = window_k + slot * stride_wkp + i_h * stride_wkh + o_t[:, None] * K + o_k[None, :]
    p_wv = window_v + slot * stride_wvp + i_h * stride_wvh + o_t[:, None] * V + o_v[None, :]
    fresh_k = tl.load(k + rows[:, None] * stride_kt + i_h * stride_kh + o_k[None, :], mask=new[:, None], other=0.0)
    fresh_v = tl.load(v + rows[:, None] * stride_vt + i_h * stride_vh + o_v[None, :], mask=new[:, None], other=0.0)
    b_k = tl.where(buffered[:, None], tl.load(p_wk, mask=buffered[:, None], other=0.0), fresh_k.to(tl.float32))
    b_v = tl.where(buffered[:, None], tl.load(p_wv, mask=buffered[:, None], other=0.0), fresh_v.to(tl.float32))
    return b_k, b_v, new


# No pointer is specialised on its alignment: an engine's step, its warm-up and the shim run one compiled variant.
@triton.jit(do_not_specialize_on_alignment=["k", "v", "slots", "fresh", "starts", "cu_seqlens", "first_window"])
def _window_states_kernel(
    k, v, pool, window_k, window_v, window_states, slots, fresh, starts, cu_seqlens, first_window, rate,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_pp, stride_ph, stride_wkp, stride_wkh, stride_wvp, stride_wvh,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Pass 1 of a prefill, one program per (V-tile, sequence, head), V-tiles fastest: the state chain alone. The
    state entering each of the sequence's windows goes to `window_states[first_window[b] + i]` for pass 2; a window
    this call completes is folded into `S`; `S` goes back to the pool. Without the outputs' products, a window is one
    product here, and pass 2 runs all windows at once. The buffer is left as it was: pass 2 still reads its rows."""
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots + i_b).to(tl.int64)
    if slot < 0:  # padding: pool and buffer untouched (pass 2 writes its zero output)
        return
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, C)
    bos = tl.load(cu_seqlens + i_b).to(tl.int64)
    eos = tl.load(cu_seqlens + i_b + 1).to(tl.int64)
    p_s = pool + slot * stride_pp + i_h * stride_ph + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s).to(tl.float32)
    if tl.load(fresh + i_b) != 0:
        b_s = tl.zeros([K, BV], dtype=tl.float32)
    b_rate = tl.load(rate + i_h).to(tl.float32)
    position = tl.load(starts + i_b).to(tl.int64)  # the absolute position of row `bos`
    end = position + (eos - bos)
    window = tl.load(first_window + i_b).to(tl.int64)
    H = tl.num_programs(2)
    for base in range(position - position % C, end, C):
        p_entry = window_states + ((window * H + i_h) * K + o_k[:, None]) * V + o_v[None, :]
        tl.store(p_entry, b_s)
        b_k, b_v, new = _window_rows(k, v, window_k, window_v, slot, i_h, bos, position, end, base, o_k, o_v, o_t,
                                     stride_kt, stride_kh, stride_vt, stride_vh, stride_wkp, stride_wkh, stride_wvp,
                                     stride_wvh, K, V)  # fmt: skip
        if base + C <= end:  # this call holds the window's last token: fold the window into S
            b_s = chunk_state_update(b_s, b_k, b_v, o_t < C, C, b_rate, o_t, DOT_PRECISION)
        window += 1
    tl.store(p_s, b_s.to(pool.dtype.element_ty))


@triton.jit(
    do_not_specialize=["num_sequences"],  # one variant for any batch (a batch of 1 would get its own)
    do_not_specialize_on_alignment=["q", "k", "v", "o", "slots", "starts", "cu_seqlens", "first_window"],
)
def _window_outputs_kernel(
    q, k, v, o, window_k, window_v, window_states, slots, starts, cu_seqlens, first_window, num_sequences, rate,
    scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_wkp, stride_wkh, stride_wvp, stride_wvh,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Pass 2, one program per (window, V-tile) and head, V-tiles fastest: a window's outputs from the state pass 1
    stored for it, in blocks of `ROWS` rows (the same tiles in a prefill and a decode; a decode computes one):
    `lam^(i+1) q S + sum_{j <= i} lam^(i-j) (q . k_j) v_j`. Windows are numbered across the call's sequences
    (`first_window` `[B+1]`, cumulative); programs past the last exit."""
    NV: tl.constexpr = V // BV
    i_v, i_w, i_h = tl.program_id(0) % NV, tl.program_id(0) // NV, tl.program_id(1)
    if i_w >= tl.load(first_window + num_sequences):
        return
    lo, hi = num_sequences * 0, num_sequences  # the sequence holding window i_w: the last b with first_window[b] <= i_w
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(first_window + mid) <= i_w:
            lo = mid
        else:
            hi = mid
    i_b = lo
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, C)
    bos = tl.load(cu_seqlens + i_b).to(tl.int64)
    eos = tl.load(cu_seqlens + i_b + 1).to(tl.int64)
    position = tl.load(starts + i_b).to(tl.int64)
    end = position + (eos - bos)
    base = position - position % C + (i_w - tl.load(first_window + i_b)).to(tl.int64) * C
    slot = tl.load(slots + i_b).to(tl.int64)
    if slot < 0:  # padding: zero output
        at = base + o_t
        rows = bos + (at - position)
        pad = (at >= position) & (at < end)
        p_o = o + rows[:, None] * stride_ot + i_h * stride_oh + o_v[None, :]
        tl.store(p_o, tl.zeros([C, BV], dtype=o.dtype.element_ty), mask=pad[:, None])
        return
    H = tl.num_programs(1)
    b_s = tl.load(window_states + ((i_w.to(tl.int64) * H + i_h) * K + o_k[:, None]) * V + o_v[None, :])
    b_rate = tl.load(rate + i_h).to(tl.float32)
    o_r = tl.arange(0, ROWS)
    b_k, b_v, _ = _window_rows(k, v, window_k, window_v, slot, i_h, bos, position, end, base, o_k, o_v, o_t,
                               stride_kt, stride_kh, stride_vt, stride_vh, stride_wkp, stride_wkh, stride_wvp,
                               stride_wvh, K, V)  # fmt: skip
    # only the blocks that hold this call's tokens
    first_new = tl.maximum(position, base) - base
    for r0 in range(first_new - first_new % ROWS, tl.minimum(end - base, C), ROWS):
        row_in_window = r0 + o_r
        at_r = base + row_in_window
        new_r = (at_r >= position) & (at_r < end)
        rows_r = bos + (at_r - position)
        b_q = tl.load(q + rows_r[:, None] * stride_qt + i_h * stride_qh + o_k[None, :], mask=new_r[:, None],
                      other=0.0).to(tl.float32)  # fmt: skip
        q_decay, intra = block_decays(b_rate, row_in_window, o_t)
        b_o = tl.dot(b_q, b_s, input_precision=DOT_PRECISION) * q_decay[:, None]
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * intra
        b_o = (b_o + tl.dot(b_qk, b_v, input_precision=DOT_PRECISION)) * scale
        tl.store(o + rows_r[:, None] * stride_ot + i_h * stride_oh + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=new_r[:, None])  # fmt: skip


@triton.jit(do_not_specialize_on_alignment=["k", "v", "slots", "starts", "cu_seqlens"])
def _window_buffer_kernel(
    k, v, window_k, window_v, slots, starts, cu_seqlens, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_wkp, stride_wkh, stride_wvp, stride_wvh, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    """Pass 3: each sequence's keys and values of its unfinished last window that arrived in the call, into the
    buffer, as fp32. Both passes before read the buffer's rows of the sequence's first window, which share their
    places with the last window's, so the buffer is written only after them. One program per (sequence, head)."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots + i_b).to(tl.int64)
    if slot < 0:
        return
    bos = tl.load(cu_seqlens + i_b).to(tl.int64)
    position = tl.load(starts + i_b).to(tl.int64)
    end = position + tl.load(cu_seqlens + i_b + 1).to(tl.int64) - bos
    base = end - end % C  # the last window's first position (== end: the call ended on the grid, nothing kept)
    o_t = tl.arange(0, C)
    at = base + o_t
    new = (at >= position) & (at < end)
    rows = (bos + at - position)[:, None]
    o_k = tl.arange(0, K)
    keys = tl.load(k + rows * stride_kt + i_h * stride_kh + o_k[None, :], mask=new[:, None])
    p_wk = window_k + slot * stride_wkp + i_h * stride_wkh + o_t[:, None] * K + o_k[None, :]
    tl.store(p_wk, keys.to(tl.float32), mask=new[:, None])
    o_v = tl.arange(0, V)
    values = tl.load(v + rows * stride_vt + i_h * stride_vh + o_v[None, :], mask=new[:, None])
    p_wv = window_v + slot * stride_wvp + i_h * stride_wvh + o_t[:, None] * V + o_v[None, :]
    tl.store(p_wv, values.to(tl.float32), mask=new[:, None])


# No pointer is specialised on its alignment, as above.
@triton.jit(do_not_specialize_on_alignment=["q", "k", "v", "o", "slots", "fresh", "starts"])
def _windowed_decode_kernel(
    q, k, v, o, pool, window_k, window_v, slots, fresh, starts, rate, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_pp, stride_ph, stride_wkp, stride_wkh, stride_wvp, stride_wvh,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TILES: tl.constexpr,
):  # fmt: skip
    """The prefill's passes for one token per sequence (a decode step), in one kernel: the outputs kernel's tiles and
    products for its row (its `ROWS`-row block of the window, the window's keys and values with its own in place),
    the state kernel's fold (when the token is its window's last; else the token joins the buffer). A program takes
    `TILES` V-tiles one after another: the keys' products, which every V-tile needs, are made once."""
    i_g, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # V-tile groups fastest, as the prefill's
    o_k = tl.arange(0, K)
    o_t = tl.arange(0, C)
    slot = tl.load(slots + i_b).to(tl.int64)
    if slot < 0:  # padding: zero output, pool and buffer untouched
        for tile in tl.static_range(TILES):
            o_v = (i_g * TILES + tile) * BV + tl.arange(0, BV)
            tl.store(o + i_b * stride_ot + i_h * stride_oh + o_v, tl.zeros([BV], dtype=o.dtype.element_ty))
        return
    is_fresh = tl.load(fresh + i_b) != 0
    at = (tl.load(starts + i_b) % C).to(tl.int32)  # the token's row in its window
    b_rate = tl.load(rate + i_h).to(tl.float32)
    p_wk = window_k + slot * stride_wkp + i_h * stride_wkh + o_t[:, None] * K + o_k[None, :]
    new_k = tl.load(k + i_b * stride_kt + i_h * stride_kh + o_k).to(tl.float32)
    mine = (o_t == at)[:, None]
    b_k = tl.where(mine, new_k[None, :], tl.load(p_wk, mask=(o_t < at)[:, None], other=0.0))
    row_in_window = at - at % ROWS + tl.arange(0, ROWS)
    live = row_in_window == at
    b_q = tl.where(live[:, None], tl.load(q + i_b * stride_qt + i_h * stride_qh + o_k)[None, :].to(tl.float32), 0.0)
    q_decay, intra = block_decays(b_rate, row_in_window, o_t)
    b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * intra
    o_rows = i_b + 0 * row_in_window
    for tile in tl.static_range(TILES):
        o_v = (i_g * TILES + tile) * BV + tl.arange(0, BV)
        p_s = pool + slot * stride_pp + i_h * stride_ph + o_k[:, None] * V + o_v[None, :]
        b_s = tl.load(p_s).to(tl.float32)
        if is_fresh:
            b_s = tl.zeros([K, BV], dtype=tl.float32)
        p_wv = window_v + slot * stride_wvp + i_h * stride_wvh + o_t[:, None] * V + o_v[None, :]
        new_v = tl.load(v + i_b * stride_vt + i_h * stride_vh + o_v).to(tl.float32)
        b_v = tl.where(mine, new_v[None, :], tl.load(p_wv, mask=(o_t < at)[:, None], other=0.0))
        b_o = tl.dot(b_q, b_s, input_precision=DOT_PRECISION) * q_decay[:, None]
        b_o = (b_o + tl.dot(b_qk, b_v, input_precision=DOT_PRECISION)) * scale
        tl.store(o + o_rows[:, None] * stride_ot + i_h * stride_oh + o_v[None, :], b_o.to(o.dtype.element_ty),
                 mask=live[:, None])  # fmt: skip
        if at == C - 1:  # the window's last token: fold it into S
            b_s = chunk_state_update(b_s, b_k, b_v, o_t < C, C, b_rate, o_t, DOT_PRECISION)
            tl.store(p_s, b_s.to(pool.dtype.element_ty))
        else:
            tl.store(p_wv, b_v, mask=mine)
            if is_fresh:  # a one-token prompt: its zero state, for the next token to read
                tl.store(p_s, b_s.to(pool.dtype.element_ty))
    if at != C - 1:  # the token's key joins the buffer (each V-tile group writes the same row: no reader races it)
        tl.store(p_wk, b_k, mask=mine)


def check_window_buffers(name: str, window_k: torch.Tensor, window_v: torch.Tensor, pool: torch.Tensor) -> None:
    P, H, K, V = pool.shape
    for buffer, label, width in ((window_k, "window_k", K), (window_v, "window_v", V)):
        if tuple(buffer.shape) != (P, H, WINDOW, width) or buffer.dtype != torch.float32:
            raise ValueError(
                f"{name}: {label} must be float32 [{P}, {H}, {WINDOW}, {width}] (the state pool's slots and heads, "
                f"{WINDOW} buffered tokens), got {buffer.dtype} {tuple(buffer.shape)}"
            )
        if buffer.stride(-1) != 1 or buffer.stride(-2) != width:
            raise ValueError(f"{name}: each {label}[p, h] must be a contiguous [{WINDOW}, {width}] matrix")


def linear_attention_windowed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor,
    starts: torch.Tensor,
    state_pool: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sequence's rows `cu_seqlens[b] .. cu_seqlens[b+1] - 1`, at absolute positions from `starts[b]`, through
    its state and window buffer in slot `slots[b]`, in place.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]` (v may be 16-bit beside fp32 q/k), any token/head strides.
        decay_rate: `[H]`; scale: multiplies q.
        cu_seqlens: `[B+1]` int32 device offsets from 0 to T (empty sequences allowed).
        starts: `[B]` int, each sequence's position before this call (its tokens so far).
        state_pool: `[P, H, K, V]` fp32, the state at the last multiple of `WINDOW` before `starts[b]`.
        window_k, window_v: `[P, H, WINDOW, K]` / `[P, H, WINDOW, V]` fp32, the keys and values since then (the
            first `starts[b] % WINDOW` rows are read; this call's tokens of an unfinished window are written).
        slots: `[B]` int, -1 = padding (zero output, pools untouched); fresh: `[B]` int8, nonzero = a new sequence
            (a zero state; its start must be 0).

    Returns:
        o `[T, H, V]` in the dtype of q (or `out`): the same bits however the sequence's tokens were split into calls.
    """
    return _launch("linear_attention_windowed", q, k, v, decay_rate, scale, cu_seqlens, starts, state_pool,
                   window_k, window_v, slots, fresh, out)  # fmt: skip


def linear_attention_windowed_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    starts: torch.Tensor,
    state_pool: torch.Tensor,
    window_k: torch.Tensor,
    window_v: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`linear_attention_windowed` for one token per sequence (row b is sequence b's): the same bits, from a kernel
    without the prefill's loops (a decode step's registers and shared memory are the prefill's one block)."""
    return _launch("linear_attention_windowed_decode", q, k, v, decay_rate, scale, None, starts, state_pool,
                   window_k, window_v, slots, fresh, out)  # fmt: skip


def _launch(name, q, k, v, decay_rate, scale, cu_seqlens, starts, state_pool, window_k, window_v, slots, fresh, out):
    """Check the arguments and launch the prefill kernel, or with no `cu_seqlens` the one-token kernel."""
    T, H, K, V = check_qkv(name, q, k, v, narrow_v=True)
    check_pool(name, state_pool, H, K, V)
    if state_pool.dtype != torch.float32:
        raise ValueError(f"{name}: state_pool must be float32 (the window form keeps no bf16 state), got bf16")
    check_window_buffers(name, window_k, window_v, state_pool)
    B = check_sequences(name, cu_seqlens, T, starts=starts, slots=slots, fresh=fresh)
    o = output_rows(name, out, q, V)
    if B == 0:
        return o
    BV = min(WINDOWED_BLOCK_V, V)
    rates = decay_rate.to(device=q.device, dtype=torch.float32).contiguous()
    tensors = (q, k, v, o, state_pool, window_k, window_v, slots, fresh, starts)
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        state_pool.stride(0), state_pool.stride(1), window_k.stride(0), window_k.stride(1), window_v.stride(0),
        window_v.stride(1),
    )  # fmt: skip
    shape = (K, V, BV, WINDOW, OUTPUT_ROWS, dot_precision(q))  # RING_LINEAR_FP32_DOT, as every fp32 product here
    if cu_seqlens is None:
        tiles = max(1, min(WINDOWED_DECODE_TILES, V // BV))
        while (V // BV) % tiles:  # every program the same number of tiles
            tiles -= 1
        _windowed_decode_kernel[(V // (BV * tiles), B, H)](
            *tensors, rates, scale, *strides, *shape, tiles, **WINDOWED_DECODE_LAUNCH
        )
    else:
        _launch_prefill(q, k, v, o, state_pool, window_k, window_v, slots, fresh, starts, cu_seqlens, rates, scale, BV)
    return o


def window_counts(cu_seqlens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """`[B+1]` int32: where each sequence's windows start in a call's numbering of windows (the last entry is their
    total). A sequence of `L` tokens from position `p` spans `ceil((p % WINDOW + L) / WINDOW)` windows. On the device,
    without a host sync."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = torch.div(starts.to(torch.int64) % WINDOW + lengths + WINDOW - 1, WINDOW, rounding_mode="floor")
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def _launch_prefill(q, k, v, o, state_pool, window_k, window_v, slots, fresh, starts, cu_seqlens, rates, scale, BV):
    """Pass 1 (the state chain, a program per sequence, head and V-tile), pass 2 (every window's outputs at once,
    from the states pass 1 kept), then the unfinished windows' keys and values into the buffer (after every reader).
    Pass 2's states take `(T / WINDOW + 2B) x H x K x V` fp32 of scratch (an engine's profiling step allocates its
    largest, so its memory profile counts it)."""
    T, H, K = q.shape
    B, V = slots.shape[0], v.shape[-1]
    first_window = window_counts(cu_seqlens, starts)
    max_windows = T // WINDOW + 2 * B  # each sequence: at most its tokens' whole windows and two partial ones
    window_states = torch.empty((max_windows, H, K, V), dtype=torch.float32, device=q.device)
    k_strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    buffer_strides = (window_k.stride(0), window_k.stride(1), window_v.stride(0), window_v.stride(1))
    _window_states_kernel[(V // BV, B, H)](
        k, v, state_pool, window_k, window_v, window_states, slots, fresh, starts, cu_seqlens, first_window, rates,
        *k_strides, state_pool.stride(0), state_pool.stride(1), *buffer_strides,
        K, V, BV, WINDOW, dot_precision(q), **WINDOWED_LAUNCH,
    )  # fmt: skip
    _window_outputs_kernel[((V // BV) * max_windows, H)](
        q, k, v, o, window_k, window_v, window_states, slots, starts, cu_seqlens, first_window, B, rates, scale,
        q.stride(0), q.stride(1), *k_strides, o.stride(0), o.stride(1), *buffer_strides,
        K, V, BV, WINDOW, OUTPUT_ROWS, dot_precision(q), **WINDOWED_LAUNCH,
    )  # fmt: skip
    _window_buffer_kernel[(B, H)](
        k, v, window_k, window_v, slots, starts, cu_seqlens, *k_strides, *buffer_strides, K, V, WINDOW
    )


class _AsServed(torch.autograd.Function):
    """Forward: as an aligned engine serves it (the window form from a zero state and an empty buffer). Backward:
    the gradient of the standard varlen prefill (the same function of q, k, v up to rounding), recomputed."""

    @staticmethod
    def forward(ctx, q, k, v, decay_rate, scale, offsets):
        ctx.save_for_backward(q, k, v, decay_rate)
        ctx.scale, ctx.offsets = scale, offsets
        T, H, K = q.shape
        N = len(offsets) - 1
        V = v.shape[-1]
        pool = torch.zeros((N, H, K, V), dtype=torch.float32, device=q.device)
        window_k = torch.zeros((N, H, WINDOW, K), dtype=torch.float32, device=q.device)
        window_v = torch.zeros((N, H, WINDOW, V), dtype=torch.float32, device=q.device)
        cu = torch.tensor(offsets, dtype=torch.int32, device=q.device)
        starts = torch.zeros(N, dtype=torch.int64, device=q.device)
        slots = torch.arange(N, dtype=torch.int32, device=q.device)
        fresh = torch.ones(N, dtype=torch.int8, device=q.device)
        return linear_attention_windowed(q, k, v, decay_rate, scale, cu, starts, pool, window_k, window_v, slots, fresh)

    @staticmethod
    def backward(ctx, do):
        q, k, v, decay_rate = ctx.saved_tensors
        leaves = [t.detach().to(q.dtype).requires_grad_() for t in (q, k, v)]  # a 16-bit v widened, exactly
        cu = torch.tensor(ctx.offsets, dtype=torch.int32, device=q.device)
        with torch.enable_grad():
            o, _ = linear_attention_varlen_triton(*leaves, decay_rate, ctx.scale, cu)
            dq, dk, dv = torch.autograd.grad(o, leaves, do)
        return dq, dk, dv.to(v.dtype), None, None, None


def linear_attention_as_served(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    offsets: Sequence[int],
) -> torch.Tensor:
    """Packed sequences computed as an aligned engine computes them, each from a zero state: the same bits as the
    engine's, however it split the sequence into prefill chunks and decode steps.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`, as the engine's layer makes them (same dtypes, same values).
        decay_rate: `[H]`; scale: multiplies q.
        offsets: `[N+1]` host offsets of the sequences, from 0 to T.

    Returns:
        o `[T, H, V]` in the dtype of q; differentiable (the backward is the standard prefill's).
    """
    offsets = list(offsets)
    if not offsets or offsets[0] != 0 or offsets[-1] != q.shape[0] or any(map(int.__gt__, offsets, offsets[1:])):
        raise ValueError(f"linear_attention_as_served: offsets must rise from 0 to {q.shape[0]} (the rows of q)")
    return _AsServed.apply(q, k, v, decay_rate, scale, offsets)
