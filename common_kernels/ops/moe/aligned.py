"""Aligned mode's experts, beside `naive.moe_combine` (same contract): a token's SwiGLU experts through fixed-tile
Triton GEMMs and its slots summed in order, so its MoE output is the same bits in any batch, and the engine and the
shim, which both call this module, compute the same bits.

A fused MoE (vLLM's, SGLang's) picks its tiles by the number of tokens and sums the slots in its own kernel; the
shim runs each expert as cuBLAS GEMMs whose kernel follows the expert's token count. Neither is batch-invariant,
nor the other's bits. Here:

1. the (token, slot) pairs are grouped by expert into blocks of `BLOCK_M` rows, padded, on the device (no host
   sync, so a CUDA graph captures it; a decode step's in one launch);
2. one kernel computes `silu(x W_gate^T) * (x W_up^T)` per pair: the two products rounded to the activation
   dtype (as two `F.linear` calls would), the SwiGLU in fp32, rounded to the activation dtype;
3. a second computes `act W_down^T` in fp32, not rounded, into each pair's own row (no padding kept);
4. a token's output is `sum_slot weight * y` in slot order, in fp32, in one launch (`combine_slots`).

Every GEMM walks its reduction in order, `BLOCK_K` at a time, so a row's sums never depend on its block. The tiles
follow the batch's size (`expert_tiles`: narrow blocks for a decode's few rows per expert, wide ones for a prefill);
that is batch-invariant only because a tile's products accumulate in the same order whatever its shape, which the
GPU tests check from 1 to 12,000 tokens (and `bench_aligned_moe` for every tile set it times). The shared expert
runs the same way, as one expert every token picks with weight 1. Forward only; under autograd the gradient is
`naive.moe_combine`'s (aligned mode's rule: the backward may be the standard one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..triton_settings import INTERPRET, max_shared_memory
from .naive import moe_combine, swiglu_mlp
from .select import aligned_route


class ExpertTiles(NamedTuple):
    """The expert GEMMs' launch: `[block_m, block_n]` output tiles walking the reduction `block_k` at a time.
    `swap_ab`: multiply the transposed tile (weights as the left operand), so a narrow block of rows still fills the
    tensor cores' 64-row side (vLLM's fused MoE does this on Hopper below 64 rows)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False


# An expert's weights are read once per block of its rows: a decode has one or two rows per expert, so its blocks
# are narrow; a long prefill's 128-row blocks read them once for up to 128 tokens. `(most tokens, tiles)`, the
# fastest set timed at 1, 64, 512, 4,096 and 16,384 tokens (RESULTS.md run V; the boundaries between those sizes are
# not measured). Every set gave the same bits at every size on an H200.
TILE_SCHEDULE: tuple[tuple[int | None, ExpertTiles], ...] = (
    (1024, ExpertTiles(16, 128, 64)),
    (8192, ExpertTiles(64, 128, 64, num_stages=4)),
    (None, ExpertTiles(128, 128, 64, num_warps=8)),
)


def expert_tiles(num_tokens: int) -> ExpertTiles:
    """The tiles for a batch of `num_tokens` tokens (`TILE_SCHEDULE`). Triton's CPU interpreter multiplies a tile
    with numpy, in its own order, so there the last set serves every batch."""
    if INTERPRET:
        return TILE_SCHEDULE[-1][1]
    return next(tiles for most, tiles in TILE_SCHEDULE if most is None or num_tokens <= most)


def tier_first_sizes() -> list[int]:
    """The smallest batch (tokens) each `TILE_SCHEDULE` tier serves: 1, then one past each tier's bound."""
    sizes, low = [], 1
    for most, _ in TILE_SCHEDULE:
        sizes.append(low)
        low = (most or low) + 1
    return sizes


# An engine's largest step in tokens (`compile_tiers_ahead`). None (the shim's default): each tier compiles when
# first used.
_warm_up_max_tokens: int | None = None
_warmed_shapes: set[tuple] = set()
WARM_UP_DEVICES = ("cuda",)  # where compiling ahead pays (the interpreter compiles nothing)


def compile_tiers_ahead(max_tokens: int) -> None:
    """From now on, a layer shape's first launch also runs, on zero rows, every tier a step of up to `max_tokens`
    tokens can take: an engine's profiling forward and CUDA graphs compile only their own sizes' tiers, and a tier
    in between would compile at a user's request (`serving.warm_up_expert_tiers` calls this at start-up)."""
    global _warm_up_max_tokens
    _warm_up_max_tokens = max_tokens


def _warm_up_tiers(x, w13, w2, k, last_w13, last_w2) -> None:
    if _warm_up_max_tokens is None or x.device.type not in WARM_UP_DEVICES:
        return
    if x.is_cuda and torch.cuda.is_current_stream_capturing():  # a graph being captured: not the place
        return
    apart = last_w13 is not None
    key = (x.dtype, x.device, x.shape[1], tuple(w13.shape), tuple(w2.shape), w13.dtype, k, apart)
    if key in _warmed_shapes:
        return
    _warmed_shapes.add(key)  # before the runs below, which come back through `_expert_outputs`
    E = w13.shape[0] + apart
    for n in tier_first_sizes():
        if n > _warm_up_max_tokens:
            break
        ids = torch.arange(k, device=x.device).remainder(E).expand(n, k).contiguous()
        if apart:
            ids[:, -1] = E - 1  # the shared expert's slot, as `aligned_route(shared_slot=True)` gives it
        weights = torch.ones((n, k), dtype=torch.float32, device=x.device)
        _expert_outputs(x.new_zeros(n, x.shape[1]), w13, w2, ids, weights, last_w13, last_w2)


def fitting_stages(tiles: ExpertTiles, itemsize: int, swiglu: bool, device: torch.device) -> int:
    """The tiles' pipeline depth, lowered until a stage's operand tiles (the rows, and the gate and up or the down
    weight tile) fit the device's shared memory that many times over: fp32 operands take twice bf16's. The depth
    moves no bits: each product still joins its row's sum in reduction order."""
    weights = 2 if swiglu else 1
    per_stage = (tiles.block_m + weights * tiles.block_n) * tiles.block_k * itemsize
    stages = tiles.num_stages
    while stages > 1 and stages * per_stage > max_shared_memory(device):
        stages -= 1
    return stages


@triton.jit
def _load(pointers, mask, WHOLE: tl.constexpr):
    """A tile's load, masked unless it is `WHOLE`."""
    return tl.load(pointers) if WHOLE else tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _accumulate(b_a, b_w, acc, SWAP_AB: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """`acc += b_a @ b_w`, or with `SWAP_AB` (operands loaded transposed) `acc += b_w @ b_a`."""
    if INTERPRET:  # the interpreter multiplies 16-bit dot operands as raw bits (`ops.triton_settings`)
        b_a, b_w = b_a.to(tl.float32), b_w.to(tl.float32)
    if SWAP_AB:
        left, right = b_w, b_a
    else:
        left, right = b_a, b_w
    return tl.dot(left, right, acc, input_precision="ieee") if IEEE or INTERPRET else tl.dot(left, right, acc)


@triton.jit(do_not_specialize=["num_experts", "K", "N", "top_k"])
def _expert_gemm_kernel(
    a, w, w_last, out, pair_of_row, expert_of_block, num_experts, K, N, top_k, up_offset,
    stride_a, stride_we, stride_wn, stride_out,
    GATHER: tl.constexpr, SWIGLU: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    SWAP_AB: tl.constexpr, LAST_APART: tl.constexpr,
):  # fmt: skip
    """One `[BLOCK_M, BLOCK_N]` tile of one expert's rows, a block's column tiles launched one after another (so a
    block's rows, and across an expert's blocks its weight tiles, are read again while in L2). `GATHER` (the first
    GEMM): padded row r reads token `pair_of_row[r] // top_k` and writes row r; else (the second) it reads row r
    and writes pair `pair_of_row[r]`.
    `SWIGLU`: also the up product (weight rows from `up_offset`), and the tile stores `silu(gate) * up`.
    `EVEN_K` / `EVEN_N`: the reduction / the columns are whole tiles, so the loads need no masks (a padding row
    reads row 0, and a row's products never involve another row's, so its result is simply not stored).
    `SWAP_AB`: the tiles are loaded and multiplied transposed, `[BLOCK_N, BLOCK_M]`, and turned back at the end.
    `LAST_APART`: the last expert's weights are `w_last` (a shared expert riding in the routed experts' launch)."""
    num_col_tiles = tl.cdiv(N, BLOCK_N)
    block, col_tile = tl.program_id(0) // num_col_tiles, tl.program_id(0) % num_col_tiles
    expert = tl.load(expert_of_block + block)
    if expert >= num_experts:  # a block past the last expert's rows
        return
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pairs = tl.load(pair_of_row + rows)
    live = pairs >= 0
    src = tl.where(live, (pairs // top_k) if GATHER else rows, 0)
    dst = rows if GATHER else pairs
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    w_e = w + expert.to(tl.int64) * stride_we
    if LAST_APART:  # noqa: SIM102 (a compile-time flag, then a runtime test: Triton takes them nested)
        if expert == num_experts - 1:
            w_e = w_last
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        if SWAP_AB:
            b_a = _load(a + src[None, :] * stride_a + ks[:, None], (ks < K)[:, None], EVEN_K)
            w_tile = w_e + cols[:, None] * stride_wn + ks[None, :]
            m_w = (cols < N)[:, None] & (ks < K)[None, :]
        else:
            b_a = _load(a + src[:, None] * stride_a + ks[None, :], (ks < K)[None, :], EVEN_K)
            w_tile = w_e + cols[None, :] * stride_wn + ks[:, None]
            m_w = (ks < K)[:, None] & (cols < N)[None, :]
        acc = _accumulate(b_a, _load(w_tile, m_w, EVEN_K and EVEN_N), acc, SWAP_AB, IEEE, INTERPRET)
        if SWIGLU:
            b_u = _load(w_tile + up_offset * stride_wn, m_w, EVEN_K and EVEN_N)
            acc_up = _accumulate(b_a, b_u, acc_up, SWAP_AB, IEEE, INTERPRET)
    if SWAP_AB:
        acc, acc_up = tl.trans(acc), tl.trans(acc_up)
    dt = out.dtype.element_ty
    if SWIGLU:
        gate = acc.to(dt).to(tl.float32)
        acc = gate / (1.0 + tl.exp(-gate)) * acc_up.to(dt).to(tl.float32)
    tl.store(out + dst[:, None] * stride_out + cols[None, :], acc.to(dt), mask=live[:, None] & (cols < N)[None, :])


def expert_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs grouped by expert, on the device: `pair_of_row` `[R]` (the pair `token * k + slot` in each padded
    row, -1 for padding) and `expert_of_block` `[R / block_m]` (`num_experts` past the last expert's rows). `R`
    depends on `T * k` and `num_experts` only, so a CUDA graph can capture it."""
    if num_experts != 1:
        if topk_ids.numel() <= ONE_LAUNCH_MAX_PAIRS:
            return _one_launch_blocks(topk_ids, num_experts, block_m)
        return _sorted_blocks(topk_ids, num_experts, block_m)
    # a shared expert or a dense layer: the pairs in order, the layout the sort would give, without it
    P = topk_ids.numel()
    rows = torch.arange(_padded_rows(P, 1, block_m), device=topk_ids.device)
    return torch.where(rows < P, rows, -1), (rows[::block_m] >= triton.cdiv(P, block_m) * block_m).long()


def _padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows enough for `num_pairs` pairs whatever their experts: each used expert pads at most `block_m - 1`."""
    return triton.cdiv(num_pairs + min(num_pairs, num_experts) * (block_m - 1), block_m) * block_m


# Up to this many (token, slot) pairs (a decode step's), one launch lays the blocks out (each of its programs counts
# every pair); above it the torch ops below (about 20 launches, little beside a prefill's GEMMs) do. Both give the
# same layout. A power of two (a `tl.arange`).
ONE_LAUNCH_MAX_PAIRS = 2048
_LAYOUT_CHUNK = 64


@triton.jit
def _block_layout_kernel(
    topk_ids, pair_of_row, expert_of_block, P, num_experts, capacity,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, MAX_PAIRS: tl.constexpr,
):  # fmt: skip
    """`_sorted_blocks` in one launch: program `p` places pairs `p * CHUNK` on (a pair's row: its expert's first row
    + the pairs of that expert before it, so the order is the stable sort's), writes -1 into its share of the
    padding rows and names its share of the blocks' experts. Every program counts all the step's pairs itself (at
    most `MAX_PAIRS`), so the programs agree on where each expert starts without a second launch; one program
    doing all of it waited on one chunk after another."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    every = tl.arange(0, MAX_PAIRS)
    all_ids = tl.load(topk_ids + every, mask=every < P, other=0).to(tl.int32)
    counts = tl.histogram(all_ids, BLOCK_E, mask=every < P)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    firsts = ends - padded
    # this program's pairs
    start = pid * CHUNK
    lanes = tl.arange(0, CHUNK)
    live = start + lanes < P
    ids = tl.load(topk_ids + start + lanes, mask=live, other=0).to(tl.int32)
    earlier_chunks = tl.histogram(all_ids, BLOCK_E, mask=every < start)  # each expert's pairs before this chunk
    earlier_here = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])
    row = tl.gather(firsts + earlier_chunks, ids, 0) + tl.sum(earlier_here.to(tl.int32), axis=1)
    tl.store(pair_of_row + row, (start + lanes).to(tl.int64), mask=live)
    # padding: the rows past each expert's pairs (experts `e % programs == p`), then the rows past the last expert's
    experts = tl.arange(0, BLOCK_E)
    slack = tl.arange(0, BLOCK_M)
    pad_rows = (firsts + counts)[:, None] + slack[None, :]
    pads = (experts % programs == pid)[:, None] & (slack[None, :] < (padded - counts)[:, None])
    tl.store(pair_of_row + pad_rows, tl.full([BLOCK_E, BLOCK_M], -1, tl.int64), mask=pads)
    for first in range(tl.sum(padded, axis=0) + pid * MAX_PAIRS, capacity, programs * MAX_PAIRS):
        tl.store(pair_of_row + first + every, tl.full([MAX_PAIRS], -1, tl.int64), mask=first + every < capacity)
    # a block's expert: how many experts end at or before its first row (`num_experts` past the last one's rows)
    blocks = capacity // BLOCK_M
    for first in range(pid * CHUNK, blocks, programs * CHUNK):
        first_rows = (first + lanes) * BLOCK_M
        ended = (ends[None, :] <= first_rows[:, None]) & (experts[None, :] < num_experts)
        tl.store(expert_of_block + first + lanes, tl.sum(ended.to(tl.int64), axis=1), mask=first + lanes < blocks)


def _one_launch_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = topk_ids.numel()
    assert P <= ONE_LAUNCH_MAX_PAIRS, "expert_blocks sends larger steps to the sorted layout"
    capacity = _padded_rows(P, num_experts, block_m)
    pair_of_row = torch.empty(capacity, dtype=torch.int64, device=topk_ids.device)
    expert_of_block = torch.empty(capacity // block_m, dtype=torch.int64, device=topk_ids.device)
    _block_layout_kernel[(max(triton.cdiv(P, _LAYOUT_CHUNK), 1),)](
        topk_ids.reshape(-1).contiguous(), pair_of_row, expert_of_block, P, num_experts, capacity,
        triton.next_power_of_2(num_experts), block_m, _LAYOUT_CHUNK, ONE_LAUNCH_MAX_PAIRS,
    )  # fmt: skip
    return pair_of_row, expert_of_block


def _sorted_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`expert_blocks` for any number of experts: the pairs sorted by expert (stable), each expert's padded."""
    device, P = topk_ids.device, topk_ids.numel()
    capacity = _padded_rows(P, num_experts, block_m)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    flat = topk_ids.reshape(-1).long()
    sorted_experts, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    first_row, first_pair = padded_end - padded, counts.cumsum(0) - counts
    row_of_sorted = first_row[sorted_experts] + torch.arange(P, device=device) - first_pair[sorted_experts]
    pair_of_row = torch.full((capacity,), -1, dtype=torch.int64, device=device).index_copy_(0, row_of_sorted, order)
    return pair_of_row, torch.searchsorted(padded_end, block_starts, right=True)


def _check(x, w13, w2, topk_ids, topk_weights) -> None:
    T, D = x.shape
    E, I = w13.shape[0], w2.shape[-1]
    problems = []
    if w13.shape != (E, 2 * I, D) or w2.shape != (E, D, I):
        problems.append(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} must be [E, 2I, D], [E, D, I] with D={D}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        problems.append(f"topk_ids {tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)}: both [{T}, k]")
    if not (x.dtype == w13.dtype == w2.dtype) or x.dtype not in (torch.float32, torch.bfloat16):
        problems.append(f"x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype} must share one dtype, float32 or bfloat16")
    if problems:
        raise ValueError("aligned experts: " + "; ".join(problems))


@torch.library.custom_op("ring_linear::aligned_expert_outputs", mutates_args=())
def aligned_expert_outputs(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """`sum_slot topk_weights[t, slot] * expert[topk_ids[t, slot]](x[t])` in fp32 `[T, D]`: `x` `[T, D]`, `w13`
    `[E, 2I, D]` (gate rows, then up rows), `w2` `[E, D, I]`, `topk_ids`/`topk_weights` `[T, k]`. A custom op, so a
    compiled engine graph calls it as one opaque computation."""
    _check(x, w13, w2, topk_ids, topk_weights)
    return _expert_outputs(x, w13, w2, topk_ids, topk_weights)


def _expert_outputs(x, w13, w2, topk_ids, topk_weights, last_w13=None, last_w2=None) -> torch.Tensor:
    """`aligned_expert_outputs`; with `last_w13` `[2I, D]` and `last_w2` `[D, I]`, expert `E` (one past `w13`'s)
    is that one, in the same launches."""
    (T, D), (E, two_i, _), k = x.shape, w13.shape, topk_ids.shape[1]
    _warm_up_tiers(x, w13, w2, k, last_w13, last_w2)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    apart = last_w13 is not None
    if apart:
        E, last_w13, last_w2 = E + 1, last_w13.contiguous(), last_w2.contiguous()
    tiles = expert_tiles(T)
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    pair_of_row, expert_of_block = expert_blocks(topk_ids, E, bm)
    R, I, ieee = pair_of_row.numel(), two_i // 2, x.dtype == torch.float32
    act = torch.empty((R, I), dtype=x.dtype, device=x.device)
    y = torch.empty((T * k, D), dtype=torch.float32, device=x.device)
    if R:
        stages = [fitting_stages(tiles, x.element_size(), swiglu, x.device) for swiglu in (True, False)]
        _expert_gemm_kernel[(R // bm * triton.cdiv(I, bn),)](
            x, w13, last_w13 if apart else w13, act, pair_of_row, expert_of_block, E, D, I, k, I,
            x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
            True, True, ieee, INTERPRET, bm, bn, bk, D % bk == 0, I % bn == 0, tiles.swap_ab, apart,
            num_warps=tiles.num_warps, num_stages=stages[0],
        )  # fmt: skip
        _expert_gemm_kernel[(R // bm * triton.cdiv(D, bn),)](
            act, w2, last_w2 if apart else w2, y, pair_of_row, expert_of_block, E, I, D, k, 0,
            act.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
            False, False, ieee, INTERPRET, bm, bn, bk, I % bk == 0, D % bn == 0, tiles.swap_ab, apart,
            num_warps=tiles.num_warps, num_stages=stages[1],
        )  # fmt: skip
    return combine_slots(y.view(T, k, D), topk_weights)


@triton.jit
def _combine_slots_kernel(y, weights, out, D, k, BLOCK_D: tl.constexpr):
    """One token's `[BLOCK_D]` columns: `acc += y[slot] * weight[slot]`, slot by slot, in fp32."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for slot in range(k):
        weight = tl.load(weights + token * k + slot).to(tl.float32)
        acc += tl.load(y + (token * k + slot) * D + cols, mask=live, other=0.0) * weight
    tl.store(out + token * D + cols, acc, mask=live)


COMBINE_BLOCK_D = 512


def combine_slots(per_slot: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """`sum_slot topk_weights[t, slot] * per_slot[t, slot]` in fp32 `[T, D]`, summed in slot order, in one launch.
    A token's sum involves its own rows only, so it is the same bits in any batch; the engine and the shim both
    call it, so whether the compiler fuses each step's multiply and add does not part them."""
    T, k, D = per_slot.shape
    out = torch.empty((T, D), dtype=torch.float32, device=per_slot.device)
    if T and D:
        _combine_slots_kernel[(T, triton.cdiv(D, COMBINE_BLOCK_D))](
            per_slot.contiguous(), topk_weights.contiguous(), out, D, k, BLOCK_D=COMBINE_BLOCK_D
        )
    return out


@aligned_expert_outputs.register_fake
def _(x, w13, w2, topk_ids, topk_weights):
    return x.new_empty(x.shape, dtype=torch.float32)


def stack_experts(
    gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor], down: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert `[I, D]` gate and up and `[D, I]` down weights as the engines hold them: `w13` `[E, 2I, D]` and
    `w2` `[E, D, I]`."""
    return torch.cat([torch.stack(list(gate)), torch.stack(list(up))], dim=1), torch.stack(list(down))


class _AlignedExperts(torch.autograd.Function):
    """The aligned forward from per-expert weights (stacked for the kernel, not kept), `moe_combine`'s gradients."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, num_experts, *weights):
        ctx.num_experts = num_experts
        ctx.save_for_backward(x, topk_ids, topk_weights, *weights)
        w13, w2 = stack_experts(
            weights[:num_experts], weights[num_experts : 2 * num_experts], weights[2 * num_experts :]
        )
        return aligned_expert_outputs(x, w13, w2, topk_ids, topk_weights)

    @staticmethod
    def backward(ctx, dy):
        x, topk_ids, topk_weights, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        E = ctx.num_experts
        # x, topk_weights and the weights, each differentiable where its gradient is asked for
        leaves = [
            t.detach().requires_grad_(need)
            for t, need in zip([x, topk_weights, *weights], [needs[0], needs[2], *needs[4:]], strict=True)
        ]
        x_, w_, params = leaves[0], leaves[1], leaves[2:]
        with torch.enable_grad():
            experts = [lambda h, e=e: swiglu_mlp(h, params[e], params[E + e], params[2 * E + e]) for e in range(E)]
            out = moe_combine(x_, topk_ids, w_, experts)
            wanted = [t for t in leaves if t.requires_grad]
            found = iter(torch.autograd.grad(out, wanted, dy, allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in leaves]
        return grads[0], None, grads[1], None, *grads[2:]


def expert_outputs(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: Sequence[torch.Tensor],
    up: Sequence[torch.Tensor],
    down: Sequence[torch.Tensor],
) -> torch.Tensor:
    """`aligned_expert_outputs` from per-expert weights (the shim's modules), differentiable: fp32 `[T, D]`."""
    weights = [*gate, *up, *down]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weights, *weights)):
        return _AlignedExperts.apply(x, topk_ids, topk_weights, len(gate), *weights)
    return aligned_expert_outputs(x, *stack_experts(gate, up, down), topk_ids, topk_weights)


def every_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared expert's routing: expert 0 for every token, weight 1 (`y * 1` and `0 + y` are exact)."""
    T = x.shape[0]
    return (
        torch.zeros((T, 1), dtype=torch.int64, device=x.device),
        torch.ones((T, 1), dtype=torch.float32, device=x.device),
    )


def engine_moe_weights(
    w13: torch.Tensor, w2: torch.Tensor, shared_experts: torch.nn.Module | None
) -> tuple[torch.Tensor | None, ...]:
    """What `aligned_moe` takes from an engine's MoE layer: the routed experts' `[E, 2I, D]` and `[E, D, I]` weights
    (gate rows, then up rows, as both engines' unquantized MoE hold them), and the shared expert's merged
    `gate_up_proj` and `down_proj` as one more expert (or None, None)."""
    if shared_experts is None:
        return w13, w2, None, None
    return w13, w2, shared_experts.gate_up_proj.weight[None], shared_experts.down_proj.weight[None]


def aligned_dense_mlp(x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """An engine's dense SwiGLU layer in aligned mode, in `x`'s dtype: `gate_up_weight` `[2I, D]` (gate rows, then up
    rows, as the engines merge them), `down_weight` `[D, I]`, run as one expert every token picks, as the shim's
    `MLP.forward(aligned=True)` does."""
    return aligned_expert_outputs(x, gate_up_weight[None], down_weight[None], *every_token(x)).to(x.dtype)


@torch.library.custom_op("ring_linear::aligned_moe", mutates_args=())
def aligned_moe(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    w13: torch.Tensor,
    w2: torch.Tensor,
    shared_w13: torch.Tensor | None,
    shared_w2: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> torch.Tensor:
    """An aligned engine's MoE layer, in `x`'s dtype: `select.aligned_route` (the batch-invariant router GEMM and
    the one-launch selection), the routed experts, plus the shared expert (`shared_w13` `[1, 2I_s, D]`,
    `shared_w2` `[1, D, I_s]`, or None), summed in fp32. The shim's `MoE.forward(aligned=True)` runs these same
    steps with autograd."""
    route = (x, gate_weight, expert_bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
    shared = shared_w13 is not None and shared_w2 is not None
    if shared and shared_w13.shape[1:] == w13.shape[1:] and shared_w2.shape[1:] == w2.shape[1:]:
        # the shared expert as expert E in the routed experts' launches, its slot last with weight 1: the slot sum
        # then adds it to the routed sum exactly as the shim's separate `routed + shared` does
        ids, weights = aligned_route(*route, shared_slot=True)
        _check(x, w13, w2, ids, weights)
        return _expert_outputs(x, w13, w2, ids, weights, shared_w13[0], shared_w2[0]).to(x.dtype)
    out = aligned_expert_outputs(x, w13, w2, *aligned_route(*route))
    if shared:
        out = out + aligned_expert_outputs(x, shared_w13, shared_w2, *every_token(x))
    return out.to(x.dtype)


@aligned_moe.register_fake
def _(x, gate_weight, expert_bias, w13, w2, shared_w13, shared_w2, *_args):
    return torch.empty_like(x)
