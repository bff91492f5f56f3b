"""qk-RMSNorm + partial NeoX RoPE (with YaRN): references and the fused Triton kernel."""

from .fused import norm_rope_triton, qk_norm_rope_triton
from .naive import apply_partial_rope, qk_norm_rope, rotary_cos_sin, rotary_inv_freq

__all__ = [
    "apply_partial_rope",
    "norm_rope_triton",
    "qk_norm_rope",
    "qk_norm_rope_triton",
    "rotary_cos_sin",
    "rotary_inv_freq",
]
