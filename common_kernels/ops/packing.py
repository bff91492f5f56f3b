"""Helpers for packed variable-length sequences (`cu_seqlens` offsets)."""

from __future__ import annotations

import torch


def is_partition(offsets: list[int], total: int) -> bool:
    """True when `offsets` start at 0, never decrease and end at `total` (valid `cu_seqlens`)."""
    decreasing = any(b < a for a, b in zip(offsets, offsets[1:], strict=False))
    return len(offsets) >= 2 and offsets[0] == 0 and offsets[-1] == total and not decreasing


def equal_length_groups(offsets: list[int], device: torch.device | str) -> list[tuple[int, list[int], torch.Tensor]]:
    """`(length, sequence indices, their token rows concatenated)` for each distinct length.

    Sequences of equal length can then run as one batch: `x[rows].reshape(len(members), length, ...)`.
    """
    groups: dict[int, list[int]] = {}
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=False)):
        groups.setdefault(b - a, []).append(n)
    return [
        (length, members, torch.cat([torch.arange(offsets[n], offsets[n] + length) for n in members]).to(device))
        for length, members in groups.items()
    ]
