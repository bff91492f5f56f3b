"""The router GEMM: fp32 logits from the activations and the fp32 gate weight, never rounded to bf16.

`RING_LINEAR_ROUTER_PRODUCTS` picks how (the shim and the engines read the same setting):
- `fp32` (default): one fp32 GEMM. On a GPU that is cuBLAS's SIMT kernel, the third-largest GEMM time of a
  served prefill step for both Ring-mini and its twin (RESULTS.md run M).
- `bf16x3`: the weight split into three bf16 parts whose sum is the weight to fp32 rounding. A bf16 activation
  times a bf16 part is exact in fp32, so one bf16 tensor-core GEMM with fp32 output over the stacked parts, and
  the parts' sum, give the fp32 GEMM's logits up to the order of fp32 additions. Used for bf16 activations
  without autograd (serving, no-grad scoring); fp32 activations and training take the fp32 GEMM. Opt-in until
  its GPU timing and logprob check have run.

Aligned mode (`router_logits(..., invariant=True)`) takes neither: a Triton GEMM with fixed tiles and exact fp32
products, so a token's logits are the same bits whatever the batch around it. cuBLAS picks its kernel by the
number of rows (a GEMV for one decode row, split-K or not for more), and vLLM's batch-invariant mode replaces no
plain GEMM on Hopper, so the router would otherwise change a request's experts with its batch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ...precision import ROUTER_DTYPE, compute_dtype

ROUTER_PRODUCT_CHOICES = ("fp32", "bf16x3")
ROUTER_PRODUCTS = os.environ.get("RING_LINEAR_ROUTER_PRODUCTS", "fp32")
if ROUTER_PRODUCTS not in ROUTER_PRODUCT_CHOICES:
    raise ValueError(
        f"RING_LINEAR_ROUTER_PRODUCTS={ROUTER_PRODUCTS!r}: choose one of {', '.join(ROUTER_PRODUCT_CHOICES)}"
    )


def split_bf16x3(weight: torch.Tensor) -> torch.Tensor:
    """`[3E, D]` bf16: the fp32 `weight` `[E, D]`'s leading, middle and trailing bf16 parts, stacked."""
    high = weight.to(torch.bfloat16)
    rest = weight - high.float()
    middle = rest.to(torch.bfloat16)
    low = (rest - middle.float()).to(torch.bfloat16)
    return torch.cat([high, middle, low])


# aligned mode's tiles: fixed, so each logit sums its products in the same order for any number of rows
INVARIANT_BLOCK_T, INVARIANT_BLOCK_E, INVARIANT_BLOCK_D = 16, 64, 32


@triton.jit(do_not_specialize=["T"])
def _invariant_router_kernel(
    x, w, y, T, D, E, stride_x, stride_w, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A `[BLOCK_T, BLOCK_E]` tile of logits per program, the hidden dim walked in order in `BLOCK_D` steps."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        m_x = (rows < T)[:, None] & (cols < D)[None, :]
        m_w = (cols < D)[:, None] & (experts < E)[None, :]
        b_x = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=m_x, other=0.0).to(tl.float32)
        b_w = tl.load(w + experts[None, :] * stride_w + cols[:, None], mask=m_w, other=0.0).to(tl.float32)
        acc = tl.dot(b_x, b_w, acc, input_precision="ieee")
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
        grid = (triton.cdiv(T, INVARIANT_BLOCK_T), triton.cdiv(E, INVARIANT_BLOCK_E))
        _invariant_router_kernel[grid](
            x, weight, y, T, D, E, x.stride(0), weight.stride(0), y.stride(0),
            INVARIANT_BLOCK_T, INVARIANT_BLOCK_E, INVARIANT_BLOCK_D,
        )  # fmt: skip
    return y


@torch.library.custom_op("ring_linear::invariant_router_logits", mutates_args=())
def invariant_router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` in fp32 with aligned mode's fixed tiles (forward only): `x` `[T, D]` fp32 or bf16, `weight`
    `[E, D]`. A custom op, so a compiled engine graph calls it as one opaque kernel."""
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
