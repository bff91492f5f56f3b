"""Aligned mode's softmax attention, beside `naive.causal_gqa_attention` (same math): one Triton kernel that the
engine runs over its paged KV cache and the shim over its packed K/V, so a query's output is the same bits in a
prefill, in a decode step and in any batch.

A query row's result depends only on its own position and the keys before it:

- keys are walked in `BLOCK_N` tiles at fixed absolute positions (0, BLOCK_N, ...) within splits of `SPLIT` keys,
  also at fixed positions: each split's online softmax starts afresh, and the splits' partial softmaxes are joined
  in split order (`_join`), by the same program in a prefill, by a second kernel after one program per split in a
  decode step (`_join_splits_kernel`: a decode's one query row then reads its keys in parallel); both kernels are
  compiled without fused multiply-adds, so the join's arithmetic is the same instructions in either;
- the rows of a query tile share its `tl.dot` instructions but not their sums (a product's row reads only its
  own query row), and the tiles fixed here fix the instructions;
- a tile past a row's own position (its query tile reaches further) is all `-inf` for that row: it adds exact
  zeros and rescales by `exp(0) = 1`, a no-op in floating point.

A tile's rows are query rows times the query heads of one KV head (`heads_per_tile`), so a decode step, one
query row per sequence, reads each KV head's keys once instead of once per query head.

So the engine, which prefills a prompt's queries together and decodes each later one alone over pages, and the
shim, which computes every position of the sequence at once from contiguous K/V, compute the same bits. fp32
inputs multiply as `RING_LINEAR_FP32_DOT` says (`ops.triton_settings.dot_precision`), shared by both sides.
Forward only; under autograd the gradient is the naive attention's (aligned mode's rule: the backward may be the
standard one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_settings import INTERPRET, dot_precision, sm_count
from .naive import causal_gqa_attention

# Fixed, so a row's reduction order never depends on the batch or on how many rows its query tile holds.
BLOCK_M, BLOCK_N = 16, 64
SPLIT = 1024  # keys per split (a multiple of BLOCK_N)
# Both kernels compile every multiply and add as its own rounded instruction, so the join is the same arithmetic in
# the prefill's kernel and in the decode's join kernel.
_LAUNCH = {"enable_fp_fusion": False}


@triton.jit
def _join(m, l, acc, m_part, l_part, acc_part):
    """Two softmaxes over disjoint keys as one: running max `m`, sum `l` and unnormalised output `acc` per row. A
    part with no keys (`m_part = -inf`, zero sum and output) joins as an exact no-op, and joining the first part
    into the empty total (`-inf`, 0, 0) gives that part exactly."""
    m_new = tl.maximum(m, m_part)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    beta = tl.exp(m_part - m_safe)
    return m_new, l * alpha + l_part * beta, acc * alpha[:, None] + acc_part * beta[:, None]


@triton.jit
def _tile_pages(table, start, kv_len, page, PAGED: tl.constexpr, TILE_IN_PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The pages of the key tile at `start` (0 past the sequence, or without pages): one id where pages hold whole
    tiles (`TILE_IN_PAGE`), else each key's. Positions are int32: an int64 division compiles to a called routine,
    which the key loop would run for every key of every tile."""
    if TILE_IN_PAGE:
        pages = tl.load(table + start // page, mask=start < kv_len, other=0).to(tl.int64)
    else:
        keys = start + tl.arange(0, BLOCK_N)
        if PAGED:
            pages = tl.load(table + keys // page, mask=keys < kv_len, other=0).to(tl.int64)
        else:
            pages = tl.zeros_like(keys).to(tl.int64)
    return pages


# the batch's and the cache's sizes are plain arguments: one compiled variant per dtype and addressing, which an
# engine compiles at start-up whatever its block size (`RingAlignedAttentionImpl`'s profiling forward)
@triton.jit(do_not_specialize=["tiles_per_seq", "scale", "page", "stride_bt", "max_splits"])
def _aligned_attention_kernel(
    q, k, v, o, cu_seqlens_q, seq_lens, kv_start, block_table, table_rows, tiles_per_seq, scale, page,
    stride_qt, stride_qh, stride_kp, stride_kr, stride_kh, stride_vp, stride_vr, stride_vh, stride_ot, stride_oh,
    stride_bt, part_m, part_l, part_acc, max_splits,
    GROUP: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr, PAGED: tl.constexpr, ROW_INDEX: tl.constexpr,
    TILE_IN_PAGE: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """`BLOCK_M // HEADS` query rows of sequence `s` times `HEADS` query heads of one KV head (row `r`: query row
    `r // HEADS`, head `r % HEADS` of the program's heads). `PAGED`: key `p` of `s` is row `p % page` of page
    `block_table[r, p // page]`, `r = table_rows[s]` (`ROW_INDEX`) or `s`; else row `kv_start[s] + p` (contiguous
    packed K/V). `TILE_IN_PAGE`: `page` is a multiple of `BLOCK_N`, so a key tile lies in one page.
    Positions within a sequence are int32, addresses int64.
    `max_splits` 0: the program walks every split of its rows and writes their output. Else (a decode step: one
    query row per sequence) program `s * max_splits + j` walks split `j` only and writes its partial softmax to
    `part_m`/`part_l` `[B, max_splits, Hq]` and `part_acc` `[B, max_splits, Hq, D]`, which `_join_splits_kernel`
    joins. One compiled kernel either way, so a split's partial is the same bits in both."""
    programs_per_tile = tl.maximum(max_splits, 1)
    split = tl.program_id(0) % programs_per_tile
    tile = tl.program_id(0) // programs_per_tile
    s = tile // tiles_per_seq
    first = (tile % tiles_per_seq) * (BLOCK_M // HEADS)
    q_start = tl.load(cu_seqlens_q + s).to(tl.int64)
    q_len = (tl.load(cu_seqlens_q + s + 1).to(tl.int64) - q_start).to(tl.int32)
    if first >= q_len:  # past this sequence's queries (a shorter one, or graph padding)
        return
    kv_len = tl.load(seq_lens + s).to(tl.int32)
    tile_rows = tl.arange(0, BLOCK_M)
    rows = first + tile_rows // HEADS
    heads = tl.program_id(1) * HEADS + tile_rows % HEADS
    live = rows < q_len
    position = kv_len - q_len + rows  # each query's absolute position: it sees keys 0..position
    d = tl.arange(0, D)
    q_rows = (q_start + rows) * stride_qt + heads * stride_qh
    b_q = tl.load(q + q_rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
    kv_h = tl.program_id(1) * HEADS // GROUP
    if PAGED:
        table = block_table + (tl.load(table_rows + s) if ROW_INDEX else s).to(tl.int64) * stride_bt
    else:
        base = tl.load(kv_start + s).to(tl.int64)
        table = block_table  # unread (`_page_ids` loads nothing without pages)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    last = kv_len - q_len + tl.minimum(first + BLOCK_M // HEADS, q_len) - 1  # the tile's furthest query position
    splits_end = last // SPLIT + 1
    if max_splits > 0:
        if split * SPLIT > last:  # a decode's split past its keys (or a padding row's: none), which the join skips
            return
        splits_end = split + 1
    for j in range(split, splits_end):
        m_j = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_j = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_j = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        # each tile's page ids are loaded one tile ahead: K/V addresses that hang on a load of the same iteration
        # leave Triton's pipeliner one K/V buffer (a load waited for each tile); a loop-carried id gets it two
        pages_next = _tile_pages(table, j * SPLIT, kv_len, page, PAGED, TILE_IN_PAGE, BLOCK_N)
        for start in range(j * SPLIT, tl.minimum(j * SPLIT + SPLIT, last + 1), BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            in_seq = keys < kv_len
            if PAGED:
                pid = pages_next
                pages_next = _tile_pages(table, start + BLOCK_N, kv_len, page, PAGED, TILE_IN_PAGE, BLOCK_N)
                if TILE_IN_PAGE:
                    in_page = (start % page + tl.arange(0, BLOCK_N)).to(tl.int64)
                else:
                    in_page = (keys % page).to(tl.int64)
                k_rows = pid * stride_kp + in_page * stride_kr
                v_rows = pid * stride_vp + in_page * stride_vr
            else:
                k_rows, v_rows = (base + keys) * stride_kr, (base + keys) * stride_vr
            b_k = tl.load(k + k_rows[:, None] + kv_h * stride_kh + d[None, :], mask=in_seq[:, None], other=0.0)
            b_v = tl.load(v + v_rows[:, None] + kv_h * stride_vh + d[None, :], mask=in_seq[:, None], other=0.0)
            b_qk = b_q
            if INTERPRET:  # the interpreter multiplies 16-bit dot operands as raw bits (`ops.triton_settings`)
                b_qk, b_k, b_v = b_q.to(tl.float32), b_k.to(tl.float32), b_v.to(tl.float32)
            scores = tl.dot(b_qk, tl.trans(b_k), input_precision=DOT) * scale
            seen = (keys[None, :] <= position[:, None]) & in_seq[None, :]
            scores = tl.where(seen, scores, float("-inf"))
            m_new = tl.maximum(m_j, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no keys yet in this split
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_j - m_safe)
            l_j = l_j * alpha + tl.sum(p, 1)
            b_p = p.to(v.dtype.element_ty)  # the probabilities in the values' dtype, as a 16-bit MMA takes them
            if INTERPRET:
                b_p = b_p.to(tl.float32)
            acc_j = tl.dot(b_p, b_v, acc_j * alpha[:, None], input_precision=DOT)
            m_j = m_new
        if max_splits > 0:  # query row 0's heads (the tile's first HEADS rows) at [s, j, head]
            at = (s.to(tl.int64) * max_splits + j) * (tl.num_programs(1) * HEADS) + heads
            row_0 = tile_rows < HEADS
            tl.store(part_m + at, m_j, mask=row_0)
            tl.store(part_l + at, l_j, mask=row_0)
            tl.store(part_acc + at[:, None] * D + d[None, :], acc_j, mask=row_0[:, None])
        else:
            m_i, l_i, acc = _join(m_i, l_i, acc, m_j, l_j, acc_j)
    if max_splits == 0:
        _store_output(o, q_start, rows, heads, live, stride_ot, stride_oh, l_i, acc, D)


@triton.jit
def _store_output(o, q_start, rows, heads, live, stride_ot, stride_oh, l_i, acc, D: tl.constexpr):
    """`acc / l` of the live rows (a row with no keys, a CUDA graph's padding: 0 / 1, zeros)."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = (q_start + rows) * stride_ot + heads * stride_oh
    d = tl.arange(0, D)
    tl.store(o + o_rows[:, None] + d[None, :], out.to(o.dtype.element_ty), mask=live[:, None])


@triton.jit(do_not_specialize=["max_splits", "stride_ot", "stride_oh"])
def _join_splits_kernel(
    part_m, part_l, part_acc, o, cu_seqlens_q, seq_lens, max_splits, stride_ot, stride_oh,
    HEADS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """A decode step's output: sequence `s`'s query row, the `HEADS` heads of program 1's KV head, its splits'
    partial softmaxes joined in split order as the one-program walk joins them (the same `[BLOCK_M]` row layout)."""
    s = tl.program_id(0)
    q_start = tl.load(cu_seqlens_q + s).to(tl.int64)
    if tl.load(cu_seqlens_q + s + 1).to(tl.int64) == q_start:  # no query (graph padding)
        return
    kv_len = tl.load(seq_lens + s).to(tl.int64)
    tile_rows = tl.arange(0, BLOCK_M)
    heads = tl.program_id(1) * HEADS + tile_rows % HEADS
    row_0 = tile_rows < HEADS
    d = tl.arange(0, D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for j in range(0, tl.cdiv(kv_len, SPLIT)):
        at = (s * max_splits + j) * (tl.num_programs(1) * HEADS) + heads
        m_j = tl.load(part_m + at, mask=row_0, other=float("-inf"))
        l_j = tl.load(part_l + at, mask=row_0, other=0.0)
        acc_j = tl.load(part_acc + at[:, None] * D + d[None, :], mask=row_0[:, None], other=0.0)
        m_i, l_i, acc = _join(m_i, l_i, acc, m_j, l_j, acc_j)
    _store_output(o, q_start, tile_rows * 0, heads, row_0, stride_ot, stride_oh, l_i, acc, D)


def heads_per_tile(group: int) -> int:
    """How many query heads of one KV head share a tile: the whole group when it divides `BLOCK_M`, else one."""
    return group if BLOCK_M % group == 0 else 1


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_dims: int) -> tuple[int, int, int]:
    if q.dim() != 3 or k.dim() != kv_dims or v.shape != k.shape or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"aligned attention: q must be [T, Hq, d] and k, v one shape ending in [Hkv, d] ({kv_dims} dims); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    T, Hq, D = q.shape
    Hkv = k.shape[-2]
    if Hq % Hkv or D < 16 or D & (D - 1):
        raise ValueError(f"aligned attention: {Hq} query heads over {Hkv} KV heads of width {D} (a power of 2 >= 16)")
    if q.dtype != k.dtype or v.dtype != k.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"aligned attention: q, k, v must share one of fp32/bf16/fp16; got {q.dtype}, {k.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("aligned attention: q, k, v need unit stride on their last dim")
    return T, Hq, Hkv


def paged_attention_aligned(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    table_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA attention of each sequence's new queries over its paged keys (an engine's step).

    Args:
        q: `[T, Hq, d]`, the sequences' new tokens packed by `cu_seqlens_q` `[B+1]`; a sequence's queries are the
            last of its `seq_lens[s]` positions (its keys, these tokens' included, are already in the cache).
        key_cache, value_cache: `[pages, page_size, Hkv, d]` (any page/row/head strides).
        block_table: `[B, >= pages per sequence]` page ids; with `table_rows` `[B]`, sequence s reads row
            `table_rows[s]` of a larger table (SGLang's `req_to_token` and its request indices, not gathered).
        max_query_len: the longest sequence's new tokens (host int: sizes the grid, so a CUDA graph fixes it).
        out: `[>= T, Hq, d]` to write into; rows past `T` are left alone.
    """
    _check(q, key_cache, value_cache, 4)
    return _launch(
        q, key_cache, value_cache, cu_seqlens_q, seq_lens, None, block_table, scale, max_query_len, out, table_rows
    )


def causal_attention_aligned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             scale: float, max_seqlen: int) -> torch.Tensor:  # fmt: skip
    """The same kernel over packed `[T, H, d]` q/k/v of whole sequences (`cu_seqlens` `[N+1]`, device): the shim's
    forward. Differentiable: the backward is `naive.causal_gqa_attention`'s."""
    _check(q, k, v, 3)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _AlignedAttention.apply(q, k, v, cu_seqlens, scale, max_seqlen)
    return _packed(q, k, v, cu_seqlens, scale, max_seqlen)


def _packed(q, k, v, cu_seqlens, scale, max_seqlen):
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return _launch(q, k[None], v[None], cu_seqlens, lengths, cu_seqlens[:-1], None, scale, max_seqlen, None)


# A decode step splits its keys over programs while the step has fewer (sequence, KV head) programs than SMs: with
# as many, one program per tile already fills the GPU, and the partials would only cost memory (64 sequences of 16K
# keys at Ring-mini's heads, 1.9 programs an SM: unsplit is the faster, RESULTS.md run AA).
SPLIT_BELOW_PROGRAMS_PER_SM = 1


def decode_splits(block_table: torch.Tensor | None, page_size: int, programs: int, max_query_len: int) -> int:
    """0 (one program walks each query tile's splits), or the splits a decode step's grid holds per sequence: as many
    as the longest sequence the cache holds (`block_table`'s width), so a CUDA graph's grid covers any length."""
    if block_table is None or max_query_len != 1:
        return 0
    if programs >= SPLIT_BELOW_PROGRAMS_PER_SM * sm_count(block_table.device):
        return 0
    return triton.cdiv(block_table.shape[1] * page_size, SPLIT)


def _launch(q, k, v, cu_seqlens_q, seq_lens, kv_start, block_table, scale, max_query_len, out, table_rows=None):
    T, Hq, D = q.shape
    page_size, Hkv = k.shape[1], k.shape[2]
    B = cu_seqlens_q.shape[0] - 1
    out = torch.empty_like(q) if out is None else out
    heads = heads_per_tile(Hq // Hkv)
    tiles_per_seq = triton.cdiv(max(max_query_len, 1), BLOCK_M // heads)
    if B == 0 or T == 0:
        return out
    paged = block_table is not None
    dummy = cu_seqlens_q  # the unused pointer of the other addressing
    max_splits = decode_splits(block_table, page_size, B * (Hq // heads), max_query_len)
    parts = [q.new_empty(1, dtype=torch.float32)] * 3  # fp32 even unused: one compiled variant serves both paths
    if max_splits:
        parts = [q.new_empty((B, max_splits, Hq, *extra), dtype=torch.float32) for extra in ((), (), (D,))]
    grid = (B * tiles_per_seq * max(max_splits, 1), Hq // heads)
    _aligned_attention_kernel[grid](
        q, k, v, out, cu_seqlens_q, seq_lens, dummy if paged else kv_start, block_table if paged else dummy,
        dummy if table_rows is None else table_rows, tiles_per_seq, scale, page_size,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), block_table.stride(0) if paged else 0, *parts, max_splits,
        GROUP=Hq // Hkv, HEADS=heads, D=D, PAGED=paged, ROW_INDEX=table_rows is not None,
        TILE_IN_PAGE=paged and page_size % BLOCK_N == 0, DOT=dot_precision(q),
        INTERPRET=INTERPRET, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPLIT=SPLIT, **_LAUNCH,
    )  # fmt: skip
    if max_splits:
        _join_splits_kernel[(B, Hq // heads)](
            *parts, out, cu_seqlens_q, seq_lens, max_splits, out.stride(0), out.stride(1),
            HEADS=heads, D=D, BLOCK_M=BLOCK_M, SPLIT=SPLIT, **_LAUNCH,
        )  # fmt: skip
    return out


class _AlignedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, max_seqlen):
        ctx.save_for_backward(q, k, v, cu_seqlens)
        ctx.scale = scale
        return _packed(q, k, v, cu_seqlens, scale, max_seqlen)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cu_seqlens = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            bounds = cu_seqlens.tolist()
            outputs = [
                causal_gqa_attention(*(t[a:b] for t in leaves), ctx.scale)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            grads = torch.autograd.grad(torch.cat(outputs), leaves, grad_out)
        return *grads, None, None, None
