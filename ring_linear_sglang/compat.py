"""Every difference between the supported SGLang releases (0.5.17 ... 0.5.23) that the adapter meets."""

from __future__ import annotations

from typing import Any


def resolve_server_args(**kwargs: Any) -> Any:
    """`ServerArgs(**kwargs)` with its derived settings resolved: in `__post_init__` up to 0.5.17, by an explicit
    `resolve_once()` since (where the per-architecture providers, our settings check among them, run)."""
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(**kwargs)
    resolve = getattr(args, "resolve_once", None)
    if resolve is not None:
        resolve()
    return args
