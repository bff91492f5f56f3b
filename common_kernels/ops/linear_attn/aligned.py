"""The token-by-token form of aligned mode's linear attention, which aligned mode served until the window form
(`windowed.py`) replaced it; `bench_aligned_linear_attn` still times it against the window form. Every token
through its sequence's state one at a time, prompt and generated tokens alike, with one fixed V-tile, so a token's
bits depend on nothing but its sequence.

The engines' default prefill cuts a step's prompts into segments sized by the batch and sums segment states in an
order set by where a chunk starts: a trainer could not know either. Run token by token instead, a token's result
is the same whether the engine prefilled it in one step or in chunks stopped anywhere (chunked prefill, a
prefix-cache hit), decoded it, or served it alone or in any batch; and it is what the shim computes over the whole
sequence in one launch. Prefill and decode are one compiled kernel (varlen or one token per sequence by a runtime
argument), kept apart from the default decode, whose launch follows the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import check_pool, check_qkv, check_sequences, output_rows

ALIGNED_BLOCK_V = 16  # aligned mode's one V-tile: the tile sets the output sum's order; 16 columns keep 8 programs
# per head busy on a single long prompt
ALIGNED_NUM_WARPS = 2  # likewise fixed: the warps share the tile's reduction over K


# Every batch-dependent integer is a runtime value and no row pointer is specialised on its alignment, so the
# prefill (varlen) and the decode (one token per sequence) of every step run one compiled variant.
@triton.jit(
    do_not_specialize=["VARLEN"],
    do_not_specialize_on_alignment=["q", "k", "v", "o", "slots", "fresh", "cu_seqlens"],
)
def _aligned_kernel(
    q, k, v, o, pool, slots, fresh, cu_seqlens, rate, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_pp, stride_ph, VARLEN,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, head, V-tile): the sequence's rows (`cu_seqlens` when VARLEN, else row i_b)
    through its `[K, BV]` fp32 state tile one token at a time. Slot -1: padding, zero output, pool untouched."""
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    slot = tl.load(slots + i_b).to(tl.int64)
    if VARLEN != 0:
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        eos = tl.load(cu_seqlens + i_b + 1).to(tl.int64)
    else:
        bos = i_b.to(tl.int64)
        eos = bos + 1
    if slot < 0:
        for row in range(bos, eos):
            tl.store(o + row * stride_ot + i_h * stride_oh + o_v, tl.zeros([BV], dtype=o.dtype.element_ty))
        return
    p_s = pool + slot * stride_pp + i_h * stride_ph + o_k[:, None] * V + o_v[None, :]
    b_s = tl.load(p_s).to(tl.float32)  # [K, BV]; a bf16 pool is widened, the math stays fp32
    if tl.load(fresh + i_b) != 0:  # a new sequence: its slot may hold a finished request's state
        b_s = tl.zeros([K, BV], dtype=tl.float32)
    lam = tl.exp(-tl.load(rate + i_h).to(tl.float32))
    # each token's q/k/v are loaded one iteration ahead, so their latency hides behind the previous token's math
    more = bos < eos
    b_q = tl.load(q + bos * stride_qt + i_h * stride_qh + o_k, mask=more & (o_k < K), other=0.0).to(tl.float32)
    b_k = tl.load(k + bos * stride_kt + i_h * stride_kh + o_k, mask=more & (o_k < K), other=0.0).to(tl.float32)
    b_v = tl.load(v + bos * stride_vt + i_h * stride_vh + o_v, mask=more & (o_v < V), other=0.0).to(tl.float32)
    for row in range(bos, eos):
        more = row + 1 < eos
        n_q = tl.load(q + (row + 1) * stride_qt + i_h * stride_qh + o_k, mask=more & (o_k < K), other=0.0)
        n_k = tl.load(k + (row + 1) * stride_kt + i_h * stride_kh + o_k, mask=more & (o_k < K), other=0.0)
        n_v = tl.load(v + (row + 1) * stride_vt + i_h * stride_vh + o_v, mask=more & (o_v < V), other=0.0)
        b_s = b_s * lam + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_q[:, None] * b_s, axis=0) * scale
        tl.store(o + row * stride_ot + i_h * stride_oh + o_v, b_o.to(o.dtype.element_ty))
        b_q, b_k, b_v = n_q.to(tl.float32), n_k.to(tl.float32), n_v.to(tl.float32)
    tl.store(p_s, b_s.to(pool.dtype.element_ty))


_no_offsets: dict[torch.device, torch.Tensor] = {}


def _unused_offsets(device: torch.device) -> torch.Tensor:
    """The int32 tensor a decode passes for `cu_seqlens` (never read), one per device: the varlen form's argument
    types, so both forms share one compiled variant."""
    if device not in _no_offsets:
        _no_offsets[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _no_offsets[device]


def _launch(name, q, k, v, decay_rate, scale, state_pool, slots, fresh, out, cu_seqlens) -> torch.Tensor:
    T, H, K, V = check_qkv(name, q, k, v, narrow_v=True)
    check_pool(name, state_pool, H, K, V)
    B = check_sequences(name, cu_seqlens, T, slots=slots, fresh=fresh)
    o = output_rows(name, out, q, V)
    if B == 0:
        return o
    BV = min(ALIGNED_BLOCK_V, V)
    varlen = cu_seqlens is not None
    _aligned_kernel[(B, H, V // BV)](
        q, k, v, o, state_pool, slots, fresh, cu_seqlens if varlen else _unused_offsets(q.device),
        decay_rate.to(device=q.device, dtype=torch.float32).contiguous(), scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        state_pool.stride(0), state_pool.stride(1), int(varlen),
        K, V, BV, num_warps=ALIGNED_NUM_WARPS,
    )  # fmt: skip
    return o


def linear_attention_aligned(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aligned mode's prefill: each sequence's rows `cu_seqlens[b] .. cu_seqlens[b+1] - 1` through its state in
    `state_pool[slots[b]]` token by token, in place.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]` (v may be 16-bit beside fp32 q/k), any token/head strides.
        decay_rate: `[H]`; scale: multiplies q.
        cu_seqlens: `[B+1]` int32 device offsets from 0 to T (empty sequences allowed).
        state_pool: `[P, H, K, V]` fp32; slots: `[B]` int, -1 = padding (zero output, pool untouched).
        fresh: `[B]` int8, nonzero = start from zero instead of the slot's state.
        out: optional `[T, H, V]` output (unit last stride).

    Returns:
        o `[T, H, V]` in the dtype of q (or `out`); the same bits as `linear_attention_aligned_decode` over the same
        tokens one step at a time.
    """
    return _launch("linear_attention_aligned", q, k, v, decay_rate, scale, state_pool, slots, fresh, out, cu_seqlens)


def linear_attention_aligned_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aligned mode's decode: one token per sequence (row b is sequence b), `linear_attention_aligned`'s contract
    and compiled kernel otherwise (the engines' CUDA graphs capture it: no allocation depends on the data)."""
    return _launch("linear_attention_aligned_decode", q, k, v, decay_rate, scale, state_pool, slots, fresh, out, None)
