"""Helpers for packed variable-length sequences (`cu_seqlens` offsets)."""

from __future__ import annotations


def group_by_length(offsets: list[int]) -> dict[int, list[int]]:
    """Sequence indices grouped by length, so sequences of equal length can run as one batch."""
    groups: dict[int, list[int]] = {}
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=False)):
        groups.setdefault(b - a, []).append(n)
    return groups
