"""Engine-neutral serving pieces both adapters share: the per-step linear-attention work and start-up warm-up."""

from .step import LinearAttentionStep, build_step
from .warmup import warm_up_linear_attention

__all__ = ["LinearAttentionStep", "build_step", "warm_up_linear_attention"]
