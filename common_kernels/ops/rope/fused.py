"""Per-head RMSNorm + partial NeoX RoPE in Triton (forward and backward), beside `naive.qk_norm_rope`.

The forward reproduces the reference's roundings: statistics in fp32, the normalised value cast to the
input dtype, times the weight (rounded again), then the rotation in fp32 and one cast back. Each element
`i` of the rotated part pairs with `i +- r/2`; both are loaded, so one program handles a whole head row.
The backward runs in fp32: the rotation transposed, then the weight, then the RMSNorm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # (token, head) rows per program: fixed, so a row's reduction order never depends on the batch


@triton.jit(do_not_specialize=["R"])
def _norm_rope_fwd_kernel(
    x, w, w2, cos, sin, y, rstd, R, NH, NH1, eps, stride_xt, stride_xh, stride_yt, stride_yh,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr, ROWS_PER: tl.constexpr,
):  # fmt: skip
    """Rows are (token, head) pairs; heads `< NH1` take the norm weight `w`, the others `w2` (q and k of one
    fused QKV output in one launch). Roundings go to y's dtype: an fp32 y from a bf16 x computes exactly what
    casting x to fp32 first would, without the copy. A program holds `ROWS_PER` rows as one tile, so their
    loads are in flight together (a loop over rows waits on each row's load in turn)."""
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BLOCK)
    m_d = o_d < D
    rot = o_d < 2 * HALF
    partner = tl.where(o_d < HALF, o_d + HALF, tl.where(rot, o_d - HALF, o_d))
    sign = tl.where(o_d < HALF, -1.0, 1.0)
    o_f = tl.where(rot, o_d % HALF, 0)
    rows = i_p * ROWS_PER + tl.arange(0, ROWS_PER)
    m_r = rows < R
    t, h = (rows // NH).to(tl.int64), rows % NH
    m_x = m_r[:, None] & m_d[None, :]
    p_x = x + t[:, None] * stride_xt + h[:, None] * stride_xh
    b_x = tl.load(p_x + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)
    b_xp = tl.load(p_x + partner[None, :], mask=m_x, other=0.0).to(tl.float32)
    if HAS_W:
        first = h[:, None] < NH1
        b_w = tl.where(
            first, tl.load(w + o_d, mask=m_d, other=0.0)[None, :], tl.load(w2 + o_d, mask=m_d, other=0.0)[None, :]
        )
        b_wp = tl.where(
            first,
            tl.load(w + partner, mask=m_d, other=0.0)[None, :],
            tl.load(w2 + partner, mask=m_d, other=0.0)[None, :],
        )
        b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
        tl.store(rstd + rows, b_rstd, mask=m_r)
        # normalised value rounded to the compute dtype, times the weight, rounded again (as torch does)
        dt = y.dtype.element_ty
        b_a = ((b_x * b_rstd[:, None]).to(dt).to(tl.float32) * b_w.to(tl.float32)).to(dt).to(tl.float32)
        b_ap = ((b_xp * b_rstd[:, None]).to(dt).to(tl.float32) * b_wp.to(tl.float32)).to(dt).to(tl.float32)
    else:
        b_a, b_ap = b_x, b_xp
    m_f = m_r[:, None] & rot[None, :]
    b_c = tl.load(cos + t[:, None] * HALF + o_f[None, :], mask=m_f, other=1.0).to(tl.float32)
    b_s = tl.load(sin + t[:, None] * HALF + o_f[None, :], mask=m_f, other=0.0).to(tl.float32)
    b_y = tl.where(rot[None, :], b_a * b_c + sign[None, :] * b_ap * b_s, b_a)
    p_y = y + t[:, None] * stride_yt + h[:, None] * stride_yh + o_d[None, :]
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_x)


@triton.jit(do_not_specialize=["R"])
def _norm_rope_bwd_kernel(
    x, w, cos, sin, dy, rstd, dx, dw_partial, R, NH,
    stride_xt, stride_xh, stride_dyt, stride_dyh, stride_dxt, stride_dxh,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr, ROWS_PER: tl.constexpr,
):  # fmt: skip
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BLOCK)
    m_d = o_d < D
    rot = o_d < 2 * HALF
    partner = tl.where(o_d < HALF, o_d + HALF, tl.where(rot, o_d - HALF, o_d))
    sign_t = tl.where(o_d < HALF, 1.0, -1.0)  # transposed rotation
    o_f = tl.where(rot, o_d % HALF, 0)
    b_w = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_W:
        b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(0, ROWS_PER):
        row = i_p * ROWS_PER + r
        if row < R:
            t, h = (row // NH).to(tl.int64), row % NH
            p_dy = dy + t * stride_dyt + h * stride_dyh
            b_dy = tl.load(p_dy + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_dyp = tl.load(p_dy + partner, mask=m_d, other=0.0).to(tl.float32)
            b_c = tl.load(cos + t * HALF + o_f, mask=rot, other=1.0).to(tl.float32)
            b_s = tl.load(sin + t * HALF + o_f, mask=rot, other=0.0).to(tl.float32)
            b_da = tl.where(rot, b_dy * b_c + sign_t * b_dyp * b_s, b_dy)
            p_dx = dx + t * stride_dxt + h * stride_dxh + o_d
            if HAS_W:
                b_rstd = tl.load(rstd + row)
                b_n = tl.load(x + t * stride_xt + h * stride_xh + o_d, mask=m_d, other=0.0).to(tl.float32) * b_rstd
                b_dw += b_da * b_n
                b_dn = b_da * b_w
                b_dx = b_rstd * (b_dn - b_n * (tl.sum(b_dn * b_n, axis=0) / D))
                tl.store(p_dx, b_dx.to(dx.dtype.element_ty), mask=m_d)
            else:
                tl.store(p_dx, b_da.to(dx.dtype.element_ty), mask=m_d)
    if HAS_W:
        tl.store(dw_partial + i_p * D + o_d, b_dw, mask=m_d)


def _launch_forward(x, w, w2, num_first_heads, cos, sin, eps, y, rstd) -> None:
    T, NH, D = x.shape
    R = T * NH
    if R == 0:
        return
    _norm_rope_fwd_kernel[(triton.cdiv(R, ROWS),)](
        x, w if w is not None else x, w2 if w2 is not None else x, cos, sin, y, rstd, R, NH, num_first_heads, eps,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        D, cos.shape[-1], triton.next_power_of_2(D), w is not None, ROWS,
    )  # fmt: skip


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, cos, sin, eps):
        T, NH, D = x.shape
        y = torch.empty((T, NH, D), dtype=x.dtype, device=x.device)
        rstd = torch.empty(T * NH, dtype=torch.float32, device=x.device)
        cos, sin = cos.contiguous(), sin.contiguous()
        _launch_forward(x, w, w, NH, cos, sin, eps, y, rstd)
        ctx.save_for_backward(x, w, cos, sin, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, cos, sin, rstd = ctx.saved_tensors
        T, NH, D = x.shape
        R = T * NH
        grid = (triton.cdiv(R, ROWS),)
        dx = torch.empty_like(x)
        dw_partial = torch.zeros((grid[0], D), dtype=torch.float32, device=x.device)
        _norm_rope_bwd_kernel[grid](
            x, w if w is not None else x, cos, sin, dy, rstd, dx, dw_partial, R, NH,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            D, cos.shape[-1], triton.next_power_of_2(D), w is not None, ROWS,
        )  # fmt: skip
        dw = dw_partial.sum(0).to(w.dtype) if w is not None else None
        return dx, dw, None, None, None


def norm_rope_triton(
    x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    """Per-head RMSNorm (skipped when `weight` is None) then partial RoPE of `x` `[T, heads, d]`."""
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"norm_rope_triton: x must be [T, heads, d] with unit last stride, got {tuple(x.shape)}")
    if cos.shape != sin.shape or cos.shape[0] != x.shape[0] or 2 * cos.shape[1] > x.shape[2]:
        raise ValueError(f"norm_rope_triton: cos/sin {tuple(cos.shape)} do not fit x {tuple(x.shape)}")
    return _NormRope.apply(x, weight, cos, sin, eps)


def qk_norm_rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton counterpart of `naive.qk_norm_rope` (same arguments, same results)."""
    return norm_rope_triton(q, q_weight, cos, sin, eps), norm_rope_triton(k, k_weight, cos, sin, eps)


@torch.library.custom_op("ring_linear::qk_norm_rope_packed", mutates_args=())
def qk_norm_rope_packed(
    qk: torch.Tensor,
    num_q_heads: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Forward-only `qk_norm_rope` of q and k held side by side, `qk` `[T, Hq + Hk, d]` (the q and k heads of a
    fused QKV output, any token stride), in one launch; returns `[T, Hq + Hk, d]` in `out_dtype`.

    Equal to casting `qk` to `out_dtype` and calling `qk_norm_rope_triton` on its two halves (the roundings
    follow `out_dtype`), without materialising the cast. Both weights are given or neither is. A custom op,
    so a compiled engine graph calls it as one opaque kernel."""
    if qk.dim() != 3 or qk.stride(-1) != 1 or not 0 < num_q_heads < qk.shape[1]:
        raise ValueError(
            f"qk_norm_rope_packed: qk must be [T, heads, d] with unit last stride and 0 < num_q_heads < heads, "
            f"got {tuple(qk.shape)} with num_q_heads={num_q_heads}"
        )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("qk_norm_rope_packed: pass both q_weight and k_weight, or neither")
    if cos.shape != sin.shape or cos.shape[0] != qk.shape[0] or 2 * cos.shape[1] > qk.shape[2]:
        raise ValueError(f"qk_norm_rope_packed: cos/sin {tuple(cos.shape)} do not fit qk {tuple(qk.shape)}")
    T, NH, D = qk.shape
    y = torch.empty((T, NH, D), dtype=out_dtype, device=qk.device)
    rstd = torch.empty(T * NH, dtype=torch.float32, device=qk.device)
    _launch_forward(qk, q_weight, k_weight, num_q_heads, cos.contiguous(), sin.contiguous(), eps, y, rstd)
    return y


def gqa_qk_norm_rope(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[T, Hq, d]` and k `[T, Hkv, d]` of a softmax layer's fused QKV output `[T, (Hq + 2 Hkv) * d]`, normed and
    rotated in one launch (`qk_norm_rope_packed`), in the QKV dtype: what the shim computes, which an aligned engine
    runs in place of its compiler's kernels."""
    T, heads = qkv.shape[0], num_heads + num_kv_heads
    qk = qk_norm_rope_packed(qkv.view(T, heads + num_kv_heads, -1)[:, :heads], num_heads, q_weight, k_weight, cos,
                             sin, eps, qkv.dtype)  # fmt: skip
    return qk[:, :num_heads], qk[:, num_heads:]


@qk_norm_rope_packed.register_fake
def _(qk, num_q_heads, q_weight, k_weight, cos, sin, eps, out_dtype):
    return qk.new_empty(qk.shape, dtype=out_dtype)
