"""Launch-side helpers shared by the linear-attention Triton kernels (the settings every kernel family shares are
`ops.triton_settings`'s)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def check_head_dims(name: str, *dims: int) -> None:
    for d in dims:
        if d < 16 or d & (d - 1):
            raise ValueError(f"{name}: head dims must be powers of two >= 16, got {dims}")


def check_qkv(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, narrow_v: bool = False
) -> tuple[int, int, int, int]:
    """Validate `[T, H, K]` q/k and `[T, H, V]` v (any token/head strides, unit stride on the last dim).

    With `narrow_v`, v may stay 16-bit beside fp32 q/k (a view of the QKV GEMM output): the forward kernels
    widen it on load, which is exact, so no fp32 copy of v is made."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"{name}: q, k must be [T, H, K] and v [T, H, V]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for t, tname in ((q, "q"), (k, "k"), (v, "v")):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: {tname} needs unit stride on its last dim (got strides {t.stride()})")
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    v_ok = v.dtype == q.dtype or (narrow_v and q.dtype == torch.float32 and v.dtype in dtypes)
    if q.dtype != k.dtype or q.dtype not in dtypes or not v_ok:
        also = " (v may be 16-bit beside fp32 q/k)" if narrow_v else ""
        raise ValueError(f"{name}: q, k, v must share one of bf16/fp16/fp32{also}; got {q.dtype}, {k.dtype}, {v.dtype}")
    T, H, K = q.shape
    V = v.shape[-1]
    check_head_dims(name, K, V)
    return T, H, K, V


def check_pool(name: str, state_pool: torch.Tensor, H: int, K: int, V: int) -> None:
    if state_pool.dim() != 4 or tuple(state_pool.shape[1:]) != (H, K, V):
        raise ValueError(f"{name}: state_pool must be [P, {H}, {K}, {V}], got {tuple(state_pool.shape)}")
    if state_pool.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{name}: state_pool must be float32 (or bf16 on explicit request), got {state_pool.dtype}")
    if state_pool.stride(-1) != 1 or state_pool.stride(-2) != V:
        raise ValueError(f"{name}: each state_pool[p, h] must be a contiguous [K, V] matrix")


def check_sequences(name: str, cu_seqlens: torch.Tensor | None, num_rows: int, **per_sequence: torch.Tensor) -> int:
    """The number of sequences B: `cu_seqlens` `[B+1]` int32 offsets, or one row each (`num_rows`) without it; each
    of `per_sequence` (slots, flags, start positions) must be `[B]`."""
    if cu_seqlens is None:
        B = num_rows
    elif cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"{name}: cu_seqlens must be [B+1] int32 offsets, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    else:
        B = cu_seqlens.shape[0] - 1
    for label, tensor in per_sequence.items():
        if tensor.shape != (B,):
            raise ValueError(f"{name}: {label} must be [{B}] (one per sequence), got {tuple(tensor.shape)}")
    return B


def output_rows(name: str, out: torch.Tensor | None, q: torch.Tensor, V: int) -> torch.Tensor:
    """The kernel's output `[T, H, V]` in q's dtype: `out` when the caller passes one (checked), else a new tensor."""
    T, H = q.shape[:2]
    if out is None:
        return torch.empty((T, H, V), dtype=q.dtype, device=q.device)
    if out.shape != (T, H, V) or out.stride(-1) != 1:
        raise ValueError(f"{name}: out must be [{T}, {H}, {V}] with unit last stride")
    return out


@triton.jit
def segment_and_tile(NT: tl.constexpr):
    """(segment, tile) of a program on a `segment_grid`: the NT tile programs of one segment and head are
    launched side by side, so they read the same token rows at about the same time and all but the first
    find them in L2 (tiles split the state or the gradient, not the tokens). The head is program_id(1)."""
    pid = tl.program_id(0)
    return pid // NT, pid % NT


@triton.jit
def segment_program(seg_seq, seg_idx, cu_seqlens, rate, N, SEG, NT: tl.constexpr):
    """The prologue of every kernel on a `segment_grid`: the program's segment slot and tile, its head, the
    sequence it serves (N: an unused slot, which the caller exits on), the segment's index in it and token
    range `[bos, eos)`, and the head's decay rate. An unused slot reads the last sequence's offsets (harmless,
    in bounds) so that the caller can test and exit after the call."""
    i_s, i_t = segment_and_tile(NT)
    i_h = tl.program_id(1)
    i_n = tl.load(seg_seq + i_s)
    i_j = tl.load(seg_idx + i_s)
    i_in = tl.minimum(i_n, N - 1)
    bos = tl.load(cu_seqlens + i_in).to(tl.int64) + i_j * SEG
    eos = tl.minimum(bos + SEG, tl.load(cu_seqlens + i_in + 1).to(tl.int64))
    return i_s, i_t, i_h, i_n, i_j, bos, eos, tl.load(rate + i_h).to(tl.float32)


@triton.jit
def chunk_decays(b_rate, BT: tl.constexpr):
    """Row offsets of a chunk, `lam^(i+1)` per row and the causal `lam^(i-j)` (i >= j, else 0) matrix: the
    decays of the chunked forms (only non-negative powers of lam)."""
    o_t = tl.arange(0, BT)
    q_decay, intra = block_decays(b_rate, o_t, o_t)
    return o_t, q_decay, intra


@triton.jit
def block_decays(b_rate, rows, cols):
    """`chunk_decays` for some of a chunk's rows against some of its columns (offsets within the chunk):
    `lam^(i+1)` per row `i` and the causal `lam^(i-j)` (i >= j, else 0), each entry the same arithmetic."""
    q_decay = tl.exp(-b_rate * (rows + 1).to(tl.float32))
    diff = (rows[:, None] - cols[None, :]).to(tl.float32)
    intra = tl.where(diff >= 0, tl.exp(-b_rate * tl.maximum(diff, 0.0)), 0.0)
    return q_decay, intra


@triton.jit
def chunk_state_update(b_s, b_k, b_v, m_t, c, b_rate, o_t, DOT_PRECISION: tl.constexpr):
    """The state after a chunk of `c` valid rows (`m_t`): `lam^c S + sum_t lam^(c-1-t) k_t^T v_t`, one product."""
    k_decay = tl.where(m_t, tl.exp(-b_rate * tl.maximum(c - 1 - o_t.to(tl.float32), 0.0)), 0.0)
    b_kd = (b_k * k_decay[:, None]).to(b_v.dtype)
    return b_s * tl.exp(-b_rate * c) + tl.dot(tl.trans(b_kd), b_v, input_precision=DOT_PRECISION)


def segment_grid(num_segments: int, num_heads: int, num_tiles: int) -> tuple[int, int]:
    """Launch grid for kernels that call `segment_and_tile(num_tiles)`."""
    return (num_segments * num_tiles, num_heads)
