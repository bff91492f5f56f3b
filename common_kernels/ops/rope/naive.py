"""QK-RMSNorm and partial NeoX ("rotate half") RoPE, with optional YaRN scaling, in plain PyTorch."""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ...config import RingLinearConfig
from ...precision import ROPE_DTYPE, compute_dtype
from ..norm.naive import rms_norm


def rotary_inv_freq(config: RingLinearConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[rotary_dim/2]` (fp32, computed as HF and vLLM do) and the cos/sin scale.

    Default RoPE: `theta^(-2i/r)`, scale 1. YaRN: transformers' own YaRN over the rotated dims, whose
    attention factor scales cos and sin.
    """
    rope = config.rope_settings()
    # on the CPU whatever the default device: the engines build the model under their GPU's device context, and a
    # GPU's pow need not round as the CPU's, where the shim computes these (one bit off in one frequency would part
    # the engine's q and k from the shim's)
    with torch.device("cpu"):
        if rope.kind == "yarn":
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
            return inv_freq.float(), float(attention_scaling)
        exponents = torch.arange(0, rope.rotary_dim, 2, dtype=torch.int64).float() / rope.rotary_dim
        return 1.0 / (rope.theta**exponents), 1.0


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[T, rotary_dim/2]` for absolute positions `[T]`, in `dtype` (fp32 or float64)."""
    angles = positions.to(dtype)[:, None] * inv_freq.to(device=positions.device, dtype=dtype)[None, :]
    return angles.cos() * scaling, angles.sin() * scaling


def rotary_table(
    max_positions: int, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_cos_sin` of positions `0 .. max_positions - 1`, computed now, for an engine to index by position.
    Indexing copies these values, so the engine's cos/sin are the bits the shim's `rotary_cos_sin` computes; a
    compiler that generated its own cos and sin (approximations of its choosing) would give other bits."""
    return rotary_cos_sin(torch.arange(max_positions, device=device), inv_freq, scaling, dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `2*cos.shape[-1]` dims of each head, NeoX style; the rest pass through.

    The rotation runs in fp32 (float64 for float64 input) and the result is cast back to `x.dtype`.

    Args:
        x: `[T, heads, d]`.
        cos, sin: `[T, r/2]`.
    """
    half = cos.shape[-1]
    dtype = compute_dtype(ROPE_DTYPE, x.dtype)
    xr = x[..., : 2 * half].to(dtype)
    x1, x2 = xr[..., :half], xr[..., half:]
    c, s = cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return torch.cat((rotated, x[..., 2 * half :]), dim=-1)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (skipped when the weight is None), then partial RoPE.

    Args:
        q: `[T, Hq, d]`; k: `[T, Hk, d]`; q_weight, k_weight: `[d]`; cos, sin: `[T, r/2]`.
    """
    if q_weight is not None:
        q = rms_norm(q, q_weight, eps)
    if k_weight is not None:
        k = rms_norm(k, k_weight, eps)
    return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
