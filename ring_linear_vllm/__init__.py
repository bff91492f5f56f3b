"""vLLM plugin for Ring-linear-2.0 (`BailingMoeLinearV2ForCausalLM`, model type `bailing_moe_linear`).

vLLM loads `register()` through the `vllm.general_plugins` entry point in every process it starts (API
server, engine core, each worker, the registry-inspection subprocess), so `vllm serve
inclusionAI/Ring-mini-linear-2.0` works with no flag and no `--trust-remote-code`.
"""

from __future__ import annotations

import os

from common_kernels.config import ARCHITECTURES  # the released checkpoints' name and the authors' aliases

MODEL_CLASS = "ring_linear_vllm.model:RingLinearForCausalLM"  # lazy: no CUDA, no model import at registration

__all__ = ["ARCHITECTURES", "MODEL_CLASS", "register"]


def register() -> None:
    """Register the config class, the architectures, the engine-config hook, our attention op as a graph
    splitting point (before any config copies the list) and the scheduler's replay-boundary stop; safe to call
    repeatedly.

    Architectures vLLM already knows are left alone (vLLM's own plugin convention: never override).
    """
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from common_kernels.config import RingLinearConfig
    from common_kernels.serving import aligned_mode

    from .compat import declare_splitting_op, models_config_map
    from .engine_config import RingLinearEngineConfig
    from .prefix_replay import install as stop_prefills_at_replay_boundary

    if aligned_mode():  # one switch: vLLM's batch invariance comes with ours (`engine_config.check_batch_invariance`)
        os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")
    AutoConfig.register(RingLinearConfig.model_type, RingLinearConfig, exist_ok=True)
    declare_splitting_op()
    known = set(ModelRegistry.get_supported_archs())
    hooks = models_config_map()
    module = MODEL_CLASS.split(":")[0]
    for arch in ARCHITECTURES:
        if arch not in known:
            ModelRegistry.register_model(arch, MODEL_CLASS)
        if getattr(ModelRegistry.models.get(arch), "module_name", None) == module:  # ours, not someone else's
            hooks.setdefault(arch, RingLinearEngineConfig)
    stop_prefills_at_replay_boundary()  # the engine core's scheduler: a resent prompt of whole blocks hits
