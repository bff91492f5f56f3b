"""Engine-neutral serving pieces both engine adapters share: the per-step linear-attention work, the start-up
warm-up, the state a rank holds, the settings refused, the checkpoint-loading loop and the router gate."""

from .checks import check_serving_settings
from .router import RouterGate
from .state import linear_state_dtype, linear_state_shape, rank_decay_rates
from .step import LinearAttentionStep, build_step
from .warmup import warm_up_linear_attention
from .weights import load_checkpoint_tensors, place_tensor

__all__ = [
    "LinearAttentionStep",
    "RouterGate",
    "build_step",
    "check_serving_settings",
    "linear_state_dtype",
    "linear_state_shape",
    "load_checkpoint_tensors",
    "place_tensor",
    "rank_decay_rates",
    "warm_up_linear_attention",
]
