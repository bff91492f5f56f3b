"""The router GEMM: fp32 logits from the activations and the fp32 gate weight, never rounded to bf16.

`RING_LINEAR_ROUTER_PRODUCTS` picks how (the shim and the engines read the same setting):
- `bf16x3` (default): the weight split into three bf16 parts whose sum is the weight to fp32 rounding. A bf16
  activation times a bf16 part is exact in fp32, so one bf16 tensor-core GEMM with fp32 output over the stacked
  parts, and the parts' sum, give the fp32 GEMM's logits up to the order of fp32 additions. Used for bf16
  activations without autograd (serving, no-grad scoring); fp32 activations and training take the fp32 GEMM.
- `fp32`: one fp32 GEMM for every input. On a GPU that is cuBLAS's SIMT kernel, the third-largest GEMM time of a
  served prefill step for both Ring-mini and its twin (vLLM's Bailing MoE runs it too; RESULTS.md run M).

Aligned mode (`router_logits(..., invariant=True)`) takes neither: a Triton GEMM with exact products whose tiles
never change a row's sums, so a token's logits are the same bits whatever the batch around it. cuBLAS picks its
kernel by the number of rows (a GEMV for one decode row, split-K or not for more), and vLLM's batch-invariant mode
replaces no plain GEMM on Hopper, so the router would otherwise change a request's experts with its batch. With bf16
activations it splits the fp32 weight as `bf16x3` does, in registers, and runs the three parts on the tensor cores
(fp32 sums; far faster than FMA chains at a prefill, RESULTS.md run V); with fp32 activations it multiplies on
FMA chains.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ...precision import ROUTER_DTYPE, compute_dtype
from ..triton_settings import INTERPRET

ROUTER_PRODUCT_CHOICES = ("fp32", "bf16x3")
ROUTER_PRODUCTS_SWITCH = "RING_LINEAR_ROUTER_PRODUCTS"
ROUTER_PRODUCTS = os.environ.get(ROUTER_PRODUCTS_SWITCH, "bf16x3")
if ROUTER_PRODUCTS not in ROUTER_PRODUCT_CHOICES:
    raise ValueError(f"{ROUTER_PRODUCTS_SWITCH}={ROUTER_PRODUCTS!r}: choose one of {', '.join(ROUTER_PRODUCT_CHOICES)}")


def split_bf16x3(weight: torch.Tensor) -> torch.Tensor:
    """`[3E, D]` bf16: the fp32 `weight` `[E, D]`'s leading, middle and trailing bf16 parts, stacked."""
    high = weight.to(torch.bfloat16)
    rest = weight - high.float()
    middle = rest.to(torch.bfloat16)
    low = (rest - middle.float()).to(torch.bfloat16)
    return torch.cat([high, middle, low])


# Aligned mode's tiles `(BLOCK_T, BLOCK_E, BLOCK_D)`. fp32 activations with the fp32 weight multiply exactly as
# Triton's FMA dot: one fused multiply-add chain per logit, over the hidden dim in order, whatever the tile. So those
# tiles may follow the batch: narrow for a decode's few rows (more programs), wide for a prefill (each weight tile
# read by more rows). bf16 activations multiply on the tensor cores: a 16-bit weight (an aligned LM head) as it is,
# the fp32 router weight as three bf16 parts (three accumulators, so a narrower tile); the products are exact in
# fp32 either way, and a row's tensor-core chain runs its hidden dim in order whatever the tile's rows and columns,
# so the split-weight tiles follow the batch too (every set `bench_aligned_moe` timed gave the same bits).
DECODE_ROUTER_TILES, PREFILL_ROUTER_TILES = (16, 16, 64), (16, 64, 32)
DECODE_MAX_ROWS = 128
TENSOR_CORE_DECODE_TILES, TENSOR_CORE_TILES = (16, 64, 64), (64, 128, 64)
SPLIT_WEIGHT_DECODE_TILES, SPLIT_WEIGHT_TILES = (16, 32, 64), (64, 64, 64)
# Up to this many rows the tensor-core paths take their narrow decode tiles (more programs for a decode's few rows):
# the router's split weight up to 1,024 (its wide tiles win from between 512 and 4,096 rows on), a 16-bit weight up
# to 64 (at 64 rows the two sets tie, at 512 the wide one is 3x faster: RESULTS.md run X)
SPLIT_WEIGHT_DECODE_MAX_ROWS = 1024
TENSOR_CORE_DECODE_MAX_ROWS = 64


def invariant_router_tiles(num_rows: int, tensor_cores: bool = False, split_weight: bool = False) -> tuple[int, ...]:
    """The tiles for `num_rows` rows: for bf16 activations with an fp32 weight `SPLIT_WEIGHT_DECODE_TILES` up to
    `SPLIT_WEIGHT_DECODE_MAX_ROWS`, else `SPLIT_WEIGHT_TILES`; for 16-bit operands `TENSOR_CORE_DECODE_TILES` up to
    `TENSOR_CORE_DECODE_MAX_ROWS`, else `TENSOR_CORE_TILES`; else `DECODE_ROUTER_TILES` up to `DECODE_MAX_ROWS`.
    Triton's CPU interpreter multiplies a tile with numpy, in its own order, so there one tile set serves every
    batch."""
    if split_weight:
        decode = num_rows <= SPLIT_WEIGHT_DECODE_MAX_ROWS and not INTERPRET
        return SPLIT_WEIGHT_DECODE_TILES if decode else SPLIT_WEIGHT_TILES
    if tensor_cores:
        decode = num_rows <= TENSOR_CORE_DECODE_MAX_ROWS and not INTERPRET
        return TENSOR_CORE_DECODE_TILES if decode else TENSOR_CORE_TILES
    return DECODE_ROUTER_TILES if num_rows <= DECODE_MAX_ROWS and not INTERPRET else PREFILL_ROUTER_TILES


@triton.jit(do_not_specialize=["T"])
def _invariant_router_kernel(
    x, w, y, T, D, E, stride_x, stride_w, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, TENSOR_CORES: tl.constexpr,
    SPLIT_WEIGHT: tl.constexpr, INTERPRET: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """A `[BLOCK_T, BLOCK_E]` tile of logits per program, the hidden dim walked in order in `BLOCK_D` steps.
    Rows and columns past the ends read the last row and column (a logit's products never involve another row's or
    column's, and those are not stored), so the loads need no mask where the hidden dim is whole tiles (`EVEN_D`):
    Triton pipelines unmasked loads only.
    `SPLIT_WEIGHT` (bf16 `x`, fp32 `w`): `w = hi + mid + lo` in bf16 parts (`split_bf16x3`'s rounding), one tensor-core
    product chain per part, the parts' logits summed small first."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    acc_mid = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        p_x = x + tl.minimum(rows, T - 1)[:, None] * stride_x + cols[None, :]
        p_w = w + tl.minimum(experts, E - 1)[None, :] * stride_w + cols[:, None]
        if EVEN_D:
            b_x, b_w = tl.load(p_x), tl.load(p_w)
        else:
            b_x = tl.load(p_x, mask=(cols < D)[None, :], other=0.0)
            b_w = tl.load(p_w, mask=(cols < D)[:, None], other=0.0)
        if SPLIT_WEIGHT:
            w_hi = b_w.to(tl.bfloat16)
            rest = b_w - w_hi.to(tl.float32)
            w_mid = rest.to(tl.bfloat16)
            w_lo = (rest - w_mid.to(tl.float32)).to(tl.bfloat16)
            if INTERPRET:  # the interpreter multiplies 16-bit dot operands as raw bits: widen them (exactly)
                x32 = b_x.to(tl.float32)
                acc = tl.dot(x32, w_hi.to(tl.float32), acc, input_precision="ieee")
                acc_mid = tl.dot(x32, w_mid.to(tl.float32), acc_mid, input_precision="ieee")
                acc_lo = tl.dot(x32, w_lo.to(tl.float32), acc_lo, input_precision="ieee")
            else:
                acc = tl.dot(b_x, w_hi, acc)
                acc_mid = tl.dot(b_x, w_mid, acc_mid)
                acc_lo = tl.dot(b_x, w_lo, acc_lo)
        elif TENSOR_CORES and not INTERPRET:
            acc = tl.dot(b_x, b_w, acc)
        else:  # the interpreter multiplies 16-bit dot operands as raw bits (`ops.triton_settings`): widen them
            acc = tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), acc, input_precision="ieee")
    if SPLIT_WEIGHT:
        acc = (acc_lo + acc_mid) + acc
    m_y = (rows < T)[:, None] & (experts < E)[None, :]
    tl.store(y + rows[:, None] * stride_y + experts[None, :], acc, mask=m_y)


def _launch_invariant(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"router logits: hidden states {tuple(x.shape)} and gate weight {tuple(weight.shape)} must be [T, D] "
            "and [E, D] with the same D"
        )
    x, weight = x.contiguous(), weight.contiguous()
    (T, D), E = x.shape, weight.shape[0]
    y = torch.empty((T, E), dtype=torch.float32, device=x.device)
    if T > 0:
        tensor_cores = x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
        split_weight = x.dtype == torch.bfloat16 and weight.dtype == torch.float32
        block_t, block_e, block_d = invariant_router_tiles(T, tensor_cores, split_weight)
        _invariant_router_kernel[(triton.cdiv(T, block_t), triton.cdiv(E, block_e))](
            x, weight, y, T, D, E, x.stride(0), weight.stride(0), y.stride(0), block_t, block_e, block_d,
            tensor_cores, split_weight, INTERPRET, D % block_d == 0,
        )  # fmt: skip
    return y


@torch.library.custom_op("ring_linear::invariant_router_logits", mutates_args=())
def invariant_router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` in fp32 with exact products, the same bits for a row in any batch (forward only): `x` `[T, D]`
    fp32 or bf16, `weight` `[E, D]`. A custom op, so a compiled engine graph calls it as one opaque kernel."""
    return _launch_invariant(x, weight)


@invariant_router_logits.register_fake
def _(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


class _InvariantRouterLogits(torch.autograd.Function):
    """The aligned forward, the plain fp32 GEMM's gradients (aligned mode's rule: the backward may be the
    standard one)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _launch_invariant(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = (dy @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (dy.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def router_logits(x: torch.Tensor, weight: torch.Tensor, invariant: bool = False) -> torch.Tensor:
    """`x @ weight.T` in fp32 (float64 for float64 inputs), `x` `[T, D]`, `weight` `[E, D]`; `invariant`: aligned
    mode's batch-invariant GEMM (fp32 and bf16 inputs; float64 has nothing to align with)."""
    differentiable = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if invariant and x.dtype != torch.float64:
        return _InvariantRouterLogits.apply(x, weight) if differentiable else invariant_router_logits(x, weight)
    if (
        ROUTER_PRODUCTS == "bf16x3"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.float32
        and not differentiable
    ):
        parts = split_bf16x3(weight)
        # CPU torch has no bf16 x bf16 -> fp32 mm: the parts widened are exact, so the fp32 GEMM is the same sum
        y = torch.mm(x, parts.t(), out_dtype=torch.float32) if x.is_cuda else F.linear(x.float(), parts.float())
        E = weight.shape[0]
        return (y[:, 2 * E :] + y[:, E : 2 * E]) + y[:, :E]  # the small parts first
    dtype = compute_dtype(ROUTER_DTYPE, x.dtype)
    return F.linear(x.to(dtype), weight.to(dtype))


def aligned_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A bias-free projection `x @ weight.T` `[..., N]` in `x`'s dtype, as aligned mode computes it: the invariant
    GEMM's fp32 sums (exact products) rounded once, as a cuBLAS GEMM rounds its fp32 accumulator, so a row's bits do
    not depend on its batch. The engines' projection layers (`serving.AlignedProjection`) and the shim's
    `Projection` both call it; differentiable (the plain GEMM's gradients)."""
    rows = x.reshape(-1, x.shape[-1])
    return router_logits(rows, weight, invariant=True).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
