"""RMSNorm in Triton for aligned mode, beside `naive.rms_norm` (same contract, same order of roundings).

An engine compiles its norms (torch.compile generates its own kernels) and eager PyTorch picks a reduction
layout by the number of rows, so neither gives a row the same bits alone and in a batch, nor the shim's bits.
Aligned mode runs this kernel on both sides: a fixed tile of `ROWS` whole rows per program, the statistics in
fp32, the normalised value rounded to the output dtype, then times the weight in that dtype (as torch does).
Forward only; under autograd the gradient is the reference's (aligned mode's rule: the backward may be the
standard one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import rms_norm

ROWS = 2  # rows per program: fixed, so a row's reduction order never depends on the batch


@triton.jit(do_not_specialize=["T"])
def _rms_norm_fwd_kernel(
    x, w, y, T, eps, stride_x, stride_y, D: tl.constexpr, BLOCK: tl.constexpr, ROWS_PER: tl.constexpr
):  # fmt: skip
    rows = (tl.program_id(0) * ROWS_PER + tl.arange(0, ROWS_PER)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = (rows < T)[:, None] & (cols < D)[None, :]
    b_x = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    dt = y.dtype.element_ty
    b_w = tl.load(w + cols, mask=cols < D, other=0.0).to(dt).to(tl.float32)
    # the product of two values of `dt` is exact in fp32: rounding it once is torch's multiply in `dt`
    b_y = ((b_x * b_rstd[:, None]).to(dt).to(tl.float32) * b_w[None, :]).to(dt)
    tl.store(y + rows[:, None] * stride_y + cols[None, :], b_y, mask=m)


@torch.library.custom_op("ring_linear::rms_norm_aligned", mutates_args=())
def rms_norm_aligned_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The kernel as a custom op (no autograd), so a compiled engine graph calls it as one opaque kernel: `x`
    `[..., D]` with unit last stride, `weight` `[D]`; returns `x`'s shape in `out_dtype`."""
    D = x.shape[-1]
    if weight.shape != (D,) or x.stride(-1) != 1:
        raise ValueError(f"rms_norm_aligned: x {tuple(x.shape)} (unit last stride) and weight {tuple(weight.shape)}")
    rows = x.reshape(-1, D)
    y = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0]:
        _rms_norm_fwd_kernel[(triton.cdiv(rows.shape[0], ROWS),)](
            rows, weight.contiguous(), y, rows.shape[0], eps, rows.stride(0), y.stride(0),
            D, triton.next_power_of_2(D), ROWS,
        )  # fmt: skip
    return y.view(x.shape)


@rms_norm_aligned_forward.register_fake
def _(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


class _AlignedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.out_dtype = eps, out_dtype
        return rms_norm_aligned_forward(x, weight, eps, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        leaves = [t.detach().requires_grad_() for t in (x, weight)]
        with torch.enable_grad():
            y = rms_norm(*leaves, ctx.eps, ctx.out_dtype)
            dx, dw = torch.autograd.grad(y, leaves, dy)
        return dx, dw, None, None


def rms_norm_aligned(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Aligned mode's `rms_norm` (fp32 and 16-bit inputs; float64 takes the reference, which it already is)."""
    out_dtype = out_dtype or x.dtype
    if x.dtype == torch.float64:
        return rms_norm(x, weight, eps, out_dtype)
    x = x.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _AlignedRMSNorm.apply(x, weight, eps, out_dtype)
    return rms_norm_aligned_forward(x, weight, eps, out_dtype)
