"""RMSNorm and the linear-attention output norm (grouped RMSNorm then sigmoid gate), in plain PyTorch."""

from __future__ import annotations

import torch

from ...precision import NORM_DTYPE, compute_dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, in the HF Ling-2.0 order.

    Statistics in fp32 (float64 for float64 input), the normalised value cast to `out_dtype`
    (default `x.dtype`), then multiplied by `weight` (no +1 offset).

    Args:
        x: `[..., D]`.
        weight: `[D]`.
    """
    out_dtype = out_dtype or x.dtype
    xf = x.to(compute_dtype(NORM_DTYPE, x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(out_dtype) * weight.to(out_dtype)


def group_rms_norm_gate(
    o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    """`RMSNorm_group(o) * weight * sigmoid(gate)`: the output norm and gate of a linear-attention layer.

    The `H*d` channels are split into `num_groups` contiguous groups, each normalised on its own (so a
    tensor-parallel rank holding whole groups needs no all-reduce). Everything runs in fp32 (float64 for
    float64 input), as in the authors' engine; the caller casts the result to the model dtype.

    Args:
        o: `[T, H*d]` attention output.
        gate: `[T, H*d]` gate pre-activation (`a @ W_g.T`).
        weight: `[H*d]`, one weight per channel.
    """
    dtype = compute_dtype(NORM_DTYPE, o.dtype)
    T, C = o.shape
    if C % num_groups:
        raise ValueError(f"group_rms_norm_gate: {C} channels do not split into {num_groups} groups")
    og = o.to(dtype).reshape(T, num_groups, C // num_groups)
    y = (og * torch.rsqrt(og.pow(2).mean(-1, keepdim=True) + eps)).reshape(T, C)
    return y * weight.to(dtype) * torch.sigmoid(gate.to(dtype))
