"""Engine-config checks vLLM runs for our architectures before it builds anything (`MODELS_CONFIG_MAP`)."""

from __future__ import annotations

from vllm import platforms
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from common_kernels.config import RingLinearConfig
from ring_linear_vllm.compat import check_kv_cache_write_width, splitting_op_name

logger = init_logger(__name__)


class RingLinearEngineConfig(VerifyAndUpdateConfig):
    """Refuse what cannot run (a TP size the heads or norm groups cannot split, or that would hang vLLM's
    KV-cache write; speculative decoding), default the LM head to fp32 and turn off hybrid prefix caching
    (not verified exact for the linear state)."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        config = vllm_config.model_config.hf_config
        if not isinstance(config, RingLinearConfig):
            raise TypeError(
                f"ring-linear: expected the model config to parse as RingLinearConfig "
                f"(model_type 'bailing_moe_linear'), got {type(config).__name__}; is the plugin's register() loaded?"
            )
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        config.check_tensor_parallel(tp_size)
        if platforms.current_platform.is_cuda():  # read now: the platform is resolved lazily
            check_kv_cache_write_width(config, tp_size)
        if vllm_config.speculative_config is not None:
            raise ValueError(
                "ring-linear: speculative decoding is not supported for Ring-linear-2.0 yet "
                "(the linear-attention state would need one copy per draft token); drop --speculative-config"
            )
        if getattr(config, "head_dtype", None) is None:
            # an fp32 LM head, as trained (paper) and as the shim computes logprobs;
            # `--hf-overrides '{"head_dtype": "model"}'` restores vLLM's default
            config.head_dtype = "float32"
        splitting_ops = vllm_config.compilation_config.splitting_ops
        if splitting_ops and splitting_op_name() not in splitting_ops:
            # the default list has it (register()); a user's own list must split there too, or a CUDA graph
            # would replay one step's state slots in another
            splitting_ops.append(splitting_op_name())
            logger.warning("ring-linear: added %s to the given splitting_ops", splitting_op_name())
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            logger.warning(
                "ring-linear: prefix caching is turned off for %s: hybrid 'align' mode is not verified "
                "exact for the linear-attention state",
                vllm_config.model_config.architecture,
            )
            cache_config.enable_prefix_caching = False
