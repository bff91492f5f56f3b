"""Engine-neutral serving pieces both engine adapters share: the per-step linear-attention work, the start-up
warm-up, the state a rank holds, the settings refused, the environment switches, the checkpoint-loading loop,
the router gate and aligned mode's projections."""

from .checks import check_serving_settings
from .projections import use_aligned_projections
from .router import RouterGate
from .state import linear_state_dtype, linear_state_shape, rank_decay_rates, window_buffer_shapes
from .step import LinearAttentionStep, build_step
from .switches import (
    ALIGNED_MODE_SWITCH,
    STACKED_STATES_SWITCH,
    aligned_mode,
    aligned_products_note,
    env_flag,
    stacked_states,
)
from .warmup import warm_up_expert_tiers, warm_up_linear_attention
from .weights import load_checkpoint_tensors, place_tensor

__all__ = [
    "ALIGNED_MODE_SWITCH",
    "LinearAttentionStep",
    "RouterGate",
    "STACKED_STATES_SWITCH",
    "aligned_mode",
    "aligned_products_note",
    "build_step",
    "check_serving_settings",
    "env_flag",
    "linear_state_dtype",
    "linear_state_shape",
    "load_checkpoint_tensors",
    "place_tensor",
    "rank_decay_rates",
    "stacked_states",
    "use_aligned_projections",
    "warm_up_expert_tiers",
    "warm_up_linear_attention",
    "window_buffer_shapes",
]
