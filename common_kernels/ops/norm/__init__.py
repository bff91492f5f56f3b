"""RMSNorm and the grouped RMSNorm + sigmoid gate: references and the fused Triton kernel."""

from .fused import group_rms_norm_gate_triton
from .naive import group_rms_norm_gate, rms_norm
from .rms import rms_norm_aligned

__all__ = ["group_rms_norm_gate", "group_rms_norm_gate_triton", "rms_norm", "rms_norm_aligned"]
