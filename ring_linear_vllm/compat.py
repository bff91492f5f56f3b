"""Every difference between the supported vLLM releases (0.26 ... 0.33), in one place."""

from __future__ import annotations

from typing import Any

import torch


def models_config_map() -> dict[str, Any]:
    """vLLM's per-architecture config hooks (`MODELS_CONFIG_MAP`, private but unchanged 0.26-0.33)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    return MODELS_CONFIG_MAP


def fused_moe(**kwargs: Any) -> torch.nn.Module:
    """vLLM's fused MoE layer: `FusedMoEFactory` since 0.33, the `FusedMoE` factory function before."""
    try:
        from vllm.model_executor.layers.fused_moe import FusedMoEFactory as factory
    except ImportError:
        from vllm.model_executor.layers.fused_moe import FusedMoE as factory
    return factory(**kwargs)


def layer_metadata(prefix: str) -> Any | None:
    """This layer's attention metadata of the current step, or None (profiling runs; 0.33 layers without any)."""
    from vllm.forward_context import get_forward_context

    metadata = get_forward_context().attn_metadata
    if metadata is None:
        return None
    if isinstance(metadata, dict):
        return metadata.get(prefix)
    return metadata


# vLLM's CUDA KV-cache write (`reshape_and_cache_flash`) launches one thread per K value of a token and, for
# the K/V-packed cache layout of 0.26+, walks the heads one warp at a time (`head += blockDim.x >> 5`): with
# fewer than 32 values per token on a rank it has no whole warp, never advances, and the engine hangs in its
# first step (seen on 2 x H200 with vLLM 0.26: both ranks spinning in it, fp32 and bf16).
MIN_KV_VALUES_PER_RANK = 32


def check_kv_cache_write_width(config, tp_size: int) -> None:
    """Raise ValueError where `tp_size` ranks would leave vLLM's CUDA KV-cache write without a whole warp."""
    Hkv, d = config.num_key_value_heads, config.head_dim

    def values_per_rank(tp: int) -> int:
        return max(1, Hkv // tp) * d  # vLLM replicates KV heads once tp > num_key_value_heads

    if values_per_rank(tp_size) >= MIN_KV_VALUES_PER_RANK:
        return
    ok = [t for t in config.tensor_parallel_sizes() if values_per_rank(t) >= MIN_KV_VALUES_PER_RANK]
    fix = (
        f"Use a tensor parallel size in {ok}"
        if ok
        else f"No tensor parallel size works: num_key_value_heads x head_dim must be at least {MIN_KV_VALUES_PER_RANK}"
    )
    raise ValueError(
        f"ring-linear: tensor parallel size {tp_size} leaves {values_per_rank(tp_size)} KV values per token on a rank "
        f"(num_key_value_heads={Hkv} / {tp_size}, head_dim={d}); vLLM's CUDA KV-cache write "
        f"(reshape_and_cache_flash) never finishes below {MIN_KV_VALUES_PER_RANK}, so the engine would hang. "
        f"{fix} (only toy configs meet this; the released models have head_dim 128)"
    )
