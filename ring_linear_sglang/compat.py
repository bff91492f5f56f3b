"""Every difference between the supported SGLang releases (0.5.17 ... 0.5.23) that the adapter meets."""

from __future__ import annotations

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
