"""Engine-neutral serving pieces both engine adapters share: the per-step linear-attention work, the start-up
warm-up, the state a rank holds, the settings refused, the environment switches, the checkpoint-loading loop
and the router gate."""

from .checks import check_serving_settings
from .router import RouterGate
from .state import linear_state_dtype, linear_state_shape, rank_decay_rates
from .step import LinearAttentionStep, build_step
from .switches import ALIGNED_MODE_SWITCH, aligned_mode, env_flag
from .warmup import warm_up_linear_attention
from .weights import load_checkpoint_tensors, place_tensor

__all__ = [
    "ALIGNED_MODE_SWITCH",
    "LinearAttentionStep",
    "RouterGate",
    "aligned_mode",
    "build_step",
    "check_serving_settings",
    "env_flag",
    "linear_state_dtype",
    "linear_state_shape",
    "load_checkpoint_tensors",
    "place_tensor",
    "rank_decay_rates",
    "warm_up_linear_attention",
]
