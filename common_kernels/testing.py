"""Tolerance helpers shared by the tests of every op and stack; no CI leniency, NaN always fails."""

from __future__ import annotations

import torch


def rel_rms_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """`rms(out - ref) / rms(ref)` in float64 (0 when both are empty or all zero)."""
    if ref.numel() == 0:
        return 0.0
    ref64, out64 = ref.detach().double(), out.detach().double()
    denom = ref64.pow(2).mean().sqrt().item()
    err = (out64 - ref64).pow(2).mean().sqrt().item()
    return err if denom == 0.0 else err / denom


def assert_rel_rms(name: str, ref: torch.Tensor, out: torch.Tensor, max_ratio: float) -> None:
    """Fail unless `out` matches `ref` in shape, is finite, and has relative RMS error <= `max_ratio`."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ratio = rel_rms_error(ref, out)
    max_abs = (out.detach().double() - ref.detach().double()).abs().max().item() if out.numel() else 0.0
    assert ratio <= max_ratio, f"{name}: relative RMS error {ratio:.3e} > {max_ratio:.1e} (max abs diff {max_abs:.3e})"


def ragged_offsets(lengths: list[int]) -> torch.Tensor:
    """`cu_seqlens` for the given sequence lengths (zeros allowed)."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.long)
