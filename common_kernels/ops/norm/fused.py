"""Grouped RMSNorm + sigmoid output gate in Triton (forward and backward), beside `naive.group_rms_norm_gate`.

One program per (block of rows, norm group): statistics, norm, weight and gate in fp32, one store. The
forward takes its rows as one tile (decode steps have few rows: their loads must overlap, not queue).
Backward, with `n = x * rstd`, `s = sigmoid(g)` and `dn = dy * w * s`:

    dx = rstd * (dn - n * mean(dn * n))      (mean over the group)
    dg = dy * n * w * s * (1 - s)
    dw = sum over rows of dy * n * s          (per-block partial sums, added up in torch)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # rows per program (backward)
FWD_ROWS = 4  # rows per forward tile: fixed, so a row's reduction order never depends on the batch


@triton.jit(do_not_specialize=["T"])
def _norm_gate_fwd_kernel(
    x, g, w, y, rstd, T, eps, stride_x, stride_g, stride_y,
    C: tl.constexpr, GS: tl.constexpr, BLOCK: tl.constexpr, ROWS_PER: tl.constexpr,
):  # fmt: skip
    """A `[ROWS_PER, group]` tile per program, its rows' loads in flight together."""
    i_r, i_g = tl.program_id(0), tl.program_id(1)
    cols = i_g * GS + tl.arange(0, BLOCK)
    m_c = tl.arange(0, BLOCK) < GS
    rows = (i_r * ROWS_PER + tl.arange(0, ROWS_PER)).to(tl.int64)
    m_r = rows < T
    m = m_r[:, None] & m_c[None, :]
    b_w = tl.load(w + cols, mask=m_c, other=0.0).to(tl.float32)
    b_x = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(g + rows[:, None] * stride_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / GS + eps)
    b_y = b_x * b_rstd[:, None] * b_w[None, :] * tl.sigmoid(b_g)
    tl.store(y + rows[:, None] * stride_y + cols[None, :], b_y.to(y.dtype.element_ty), mask=m)
    tl.store(rstd + rows * (C // GS) + i_g, b_rstd, mask=m_r)


@triton.jit(do_not_specialize=["T"])
def _norm_gate_bwd_kernel(
    x, g, w, dy, rstd, dx, dg, dw_partial, T, stride_x, stride_g, stride_dy, stride_dx, stride_dg,
    C: tl.constexpr, GS: tl.constexpr, BLOCK: tl.constexpr, ROWS_PER: tl.constexpr,
):  # fmt: skip
    i_r, i_g = tl.program_id(0), tl.program_id(1)
    cols = i_g * GS + tl.arange(0, BLOCK)
    m_c = tl.arange(0, BLOCK) < GS
    b_w = tl.load(w + cols, mask=m_c, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(0, ROWS_PER):
        row = (i_r * ROWS_PER + r).to(tl.int64)
        if row < T:
            b_x = tl.load(x + row * stride_x + cols, mask=m_c, other=0.0).to(tl.float32)
            b_g = tl.load(g + row * stride_g + cols, mask=m_c, other=0.0).to(tl.float32)
            b_dy = tl.load(dy + row * stride_dy + cols, mask=m_c, other=0.0).to(tl.float32)
            b_rstd = tl.load(rstd + row * (C // GS) + i_g)
            b_n = b_x * b_rstd
            b_s = tl.sigmoid(b_g)
            b_dn = b_dy * b_w * b_s
            b_dx = b_rstd * (b_dn - b_n * (tl.sum(b_dn * b_n, axis=0) / GS))
            tl.store(dx + row * stride_dx + cols, b_dx.to(dx.dtype.element_ty), mask=m_c)
            tl.store(
                dg + row * stride_dg + cols, (b_dy * b_n * b_w * b_s * (1 - b_s)).to(dg.dtype.element_ty), mask=m_c
            )
            b_dw += b_dy * b_n * b_s
    tl.store(dw_partial + i_r * C + cols, b_dw, mask=m_c)


def _forward(x, g, w, num_groups, eps, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    T, C = x.shape
    GS = C // num_groups
    y = torch.empty((T, C), dtype=out_dtype, device=x.device)
    rstd = torch.empty((T, num_groups), dtype=torch.float32, device=x.device)
    if T == 0:
        return y, rstd
    grid = (triton.cdiv(T, FWD_ROWS), num_groups)
    block = triton.next_power_of_2(GS)
    _norm_gate_fwd_kernel[grid](x, g, w, y, rstd, T, eps, x.stride(0), g.stride(0), y.stride(0), C, GS, block, FWD_ROWS)
    return y, rstd


class _GroupNormGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, w, num_groups, eps, out_dtype):
        y, rstd = _forward(x, g, w, num_groups, eps, out_dtype)
        ctx.save_for_backward(x, g, w, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, w, rstd = ctx.saved_tensors
        T, C = x.shape
        GS = C // ctx.num_groups
        grid = (triton.cdiv(T, ROWS), ctx.num_groups)
        dx, dg = torch.empty_like(x), torch.empty_like(g)
        dw_partial = torch.zeros((grid[0], C), dtype=torch.float32, device=x.device)
        dy = dy.contiguous()
        _norm_gate_bwd_kernel[grid](
            x, g, w, dy, rstd, dx, dg, dw_partial, T,
            x.stride(0), g.stride(0), dy.stride(0), dx.stride(0), dg.stride(0),
            C, GS, triton.next_power_of_2(GS), ROWS,
        )  # fmt: skip
        return dx, dg, dw_partial.sum(0).to(w.dtype), None, None, None


def group_rms_norm_gate_triton(
    o: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    num_groups: int,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Triton `RMSNorm_group(o) * weight * sigmoid(gate)`; same contract as `naive.group_rms_norm_gate`.

    Args:
        o: `[T, C]`; gate: `[T, C]`; weight: `[C]`; each with unit stride on the channel dim.
        out_dtype: result dtype (default fp32, as the reference, whose caller casts).
    """
    T, C = o.shape
    if gate.shape != (T, C) or weight.shape != (C,):
        raise ValueError(
            f"group_rms_norm_gate_triton: o {tuple(o.shape)}, gate {tuple(gate.shape)}, weight {tuple(weight.shape)}"
        )
    if C % num_groups:
        raise ValueError(f"group_rms_norm_gate_triton: {C} channels do not split into {num_groups} groups")
    if o.stride(-1) != 1 or gate.stride(-1) != 1:
        raise ValueError("group_rms_norm_gate_triton: o and gate need unit stride on the channel dim")
    out_dtype = out_dtype or torch.float32
    if torch.is_grad_enabled() and (o.requires_grad or gate.requires_grad or weight.requires_grad):
        return _GroupNormGate.apply(o, gate, weight.contiguous(), num_groups, eps, out_dtype)
    return group_rms_norm_gate_forward(o, gate, weight.contiguous(), num_groups, eps, out_dtype)


@torch.library.custom_op("ring_linear::group_rms_norm_gate_forward", mutates_args=())
def group_rms_norm_gate_forward(
    o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, num_groups: int, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """The forward of `group_rms_norm_gate_triton` as a custom op (no autograd), so a compiled engine graph
    calls it as one opaque kernel; arguments checked by the caller."""
    return _forward(o, gate, weight, num_groups, eps, out_dtype)[0]


@group_rms_norm_gate_forward.register_fake
def _(o, gate, weight, num_groups, eps, out_dtype):
    return o.new_empty(o.shape, dtype=out_dtype)
