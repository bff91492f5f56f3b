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
