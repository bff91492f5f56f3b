"""Shared core of ring-linear: config, decay slopes, reference ops (and kernels), and the training shim.

Importing the package registers `RingLinearConfig` with `transformers.AutoConfig` and the shim with
`transformers.AutoModelForCausalLM` for `model_type = "bailing_moe_linear"`, so the released checkpoints parse
and load without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .config import RingLinearConfig, RingLinearConfigError
from .errors import InvalidInputError, RingLinearError
from .model.cache import RingLinearCache
from .model.checkpoint import CheckpointError, check_checkpoint, expected_tensor_shapes
from .model.modeling import RingLinearForCausalLM
from .presets import PRESETS, RECONSTRUCTED, preset_config, tiny_config
from .slopes import alibi_slopes, decay_rates, layer_decay_factor

AutoConfig.register(RingLinearConfig.model_type, RingLinearConfig, exist_ok=True)
AutoModelForCausalLM.register(RingLinearConfig, RingLinearForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "RECONSTRUCTED",
    "CheckpointError",
    "InvalidInputError",
    "RingLinearCache",
    "RingLinearConfig",
    "RingLinearConfigError",
    "RingLinearError",
    "RingLinearForCausalLM",
    "alibi_slopes",
    "check_checkpoint",
    "decay_rates",
    "expected_tensor_shapes",
    "layer_decay_factor",
    "preset_config",
    "tiny_config",
]
