"""SGLang adapter for Ring-linear-2.0 (`BailingMoeLinearV2ForCausalLM`, model type `bailing_moe_linear`).

`register()` adds the config SGLang parses the released `config.json` into (with the state description its
pool is sized from), the hybrid-model spec naming the linear-attention backend (`backend.py`), the launcher's
settings check and the model (`model.py`). SGLang's processes run it through the `sglang.srt.plugins` entry point.
"""

from __future__ import annotations

from common_kernels.config import ARCHITECTURES

BACKEND_CLASS = "ring_linear_sglang.backend.RingLinearAttnBackend"  # imported lazily by SGLang's model runner

__all__ = ["ARCHITECTURES", "BACKEND_CLASS", "register"]

_registered = False


def register() -> None:
    """Register the config (SGLang's config registry), the hybrid-model spec, the settings check and the model
    class for each architecture (an architecture SGLang already knows is left alone). Idempotent; creates no
    CUDA context (SGLang runs it in the launcher, the engine and every scheduler process)."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.overrides import register_model_override
    from sglang.srt.configs.linear_attn_model_registry import LinearAttnModelSpec, register_linear_attn_model
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.utils.hf_transformers import common

    from .config import RingLinearSGLangConfig
    from .model import RingLinearForCausalLM
    from .settings import check_server_args

    common._CONFIG_REGISTRY[RingLinearSGLangConfig.model_type] = RingLinearSGLangConfig
    register_linear_attn_model(
        LinearAttnModelSpec(
            config_class=RingLinearSGLangConfig,
            backend_class_name=BACKEND_CLASS,
            arch_names=list(ARCHITECTURES),
            uses_mamba_radix_cache=True,
            support_mamba_cache=True,
            support_mamba_cache_extra_buffer=False,
        )
    )
    for arch in ARCHITECTURES:
        register_model_override(arch)(check_server_args)
        ModelRegistry.models.setdefault(arch, RingLinearForCausalLM)
    _registered = True
