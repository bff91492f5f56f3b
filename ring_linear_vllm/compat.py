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


def fused_moe_weight_paths(layer: torch.nn.Module) -> tuple[str, str]:
    """Where vLLM's fused MoE layer keeps the routed experts' `w13_weight` and `w2_weight`, as attribute paths from
    `layer` (on the layer itself, or on the runner it returns, by release), for `layer.get_parameter`."""
    names = [name for name, _ in layer.named_parameters()]
    paths = [next((n for n in names if n.rsplit(".", 1)[-1] == leaf), None) for leaf in ("w13_weight", "w2_weight")]
    if None in paths:
        raise RuntimeError(f"ring-linear: vLLM's fused MoE layer has no w13_weight/w2_weight parameters ({names})")
    return paths[0], paths[1]


LINEAR_ATTENTION_OP = "ring_linear_attention"  # registered as torch.ops.vllm.ring_linear_attention


def splitting_op_name() -> str:
    return f"vllm::{LINEAR_ATTENTION_OP}"


def declare_splitting_op() -> None:
    """Make vLLM split its piecewise graphs at our state update, as at its own attention ops.

    `CompilationConfig._attention_ops` (private, stable 0.26-0.33) is copied into every config's default
    `splitting_ops`; `register()` runs in each vLLM process before any config exists, so appending there
    reaches them all. A user who passes `splitting_ops` must list this op too (the engine config checks)."""
    from vllm.config.compilation import CompilationConfig

    if splitting_op_name() not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(splitting_op_name())


def register_splitting_op(name: str, fn, fake, mutates_args: list[str]) -> None:
    """Register `torch.ops.vllm.<name>` as vLLM registers its attention ops; on 0.33 it also breaks a
    breakable CUDA-graph capture (it reads the step's metadata, which a graph cannot)."""
    from vllm.platforms import current_platform
    from vllm.utils.torch_utils import direct_register_custom_op

    try:
        from vllm.compilation.breakable_cudagraph import eager_break_during_capture
    except ImportError:  # 0.26
        eager_break_during_capture = None
    if eager_break_during_capture is not None:
        fn = eager_break_during_capture(fn)
    direct_register_custom_op(
        op_name=name, op_func=fn, mutates_args=mutates_args, fake_impl=fake,
        dispatch_key=current_platform.dispatch_key,
    )  # fmt: skip


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


def wrap_once(owner: Any, name: str, make_wrapper: Any) -> None:
    """Replace `owner.name` by `make_wrapper(original)`, once: registration runs in every vLLM process, maybe more
    than once, and a release without the attribute is left alone."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "ring_linear", False):
        return
    wrapper = make_wrapper(original)
    wrapper.ring_linear = True
    setattr(owner, name, wrapper)
