"""Every difference between the supported SGLang releases (0.5.17 ... 0.5.23) that the adapter meets."""

from __future__ import annotations

import inspect
from typing import Any


def resolve_server_args(**kwargs: Any) -> Any:
    """`ServerArgs(**kwargs)` with its derived settings resolved, as the launcher does: in `__post_init__` up to
    0.5.17, by `resolve_once()` since; the per-architecture providers (our settings check) run there."""
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(**kwargs)
    resolve = getattr(args, "resolve_once", None)
    if resolve is not None:
        resolve()
    return args


def resolved(server_args: Any) -> Any:
    """The settings after resolution: the record itself up to 0.5.17; since, a read-only view over the record
    and the values resolution declared (the record keeps the user's inputs)."""
    try:
        from sglang.srt.arg_groups.model_override_base import resolved_view
    except ImportError:  # 0.5.17
        return server_args
    return resolved_view(server_args)


def top_k(layer_id: int, **kwargs: Any) -> Any:
    """SGLang's `TopK`; since 0.5.23 it takes the layer id (for expert-distribution recording)."""
    from sglang.srt.layers.moe.topk import TopK

    if "layer_id" in inspect.signature(TopK.__init__).parameters:
        kwargs["layer_id"] = layer_id
    return TopK(**kwargs)


def bind_top_k(topk: Any, experts: Any) -> None:
    """Since 0.5.23 the top-k op learns from the experts whether the routed scaling is fused into the top-k
    weights and which runner runs them (the native Bailing model does the same); before, nothing to do."""
    if hasattr(topk, "bind_runner_backend"):
        topk.topk_config.apply_routed_scaling_factor_on_output = experts.should_fuse_routed_scaling_factor_in_topk
        topk.bind_runner_backend(experts.runner_backend, routing_method_type=experts.routing_method_type)
