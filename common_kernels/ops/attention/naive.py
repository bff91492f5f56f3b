"""Causal GQA softmax attention, one sequence at a time, in plain PyTorch."""

from __future__ import annotations

import torch

from ...precision import ATTN_SOFTMAX_DTYPE, compute_dtype


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of the last `Tq` positions of one sequence over all its `Tk` keys.

    Query `i` sits at position `Tk - Tq + i` and sees keys `0..Tk-Tq+i` (bottom-right aligned causal
    mask), so the same call serves prefill (`Tq == Tk`) and decode against a KV cache. Each KV head
    serves `Hq / Hkv` consecutive query heads. Scores and softmax in fp32 (float64 for float64 input).

    Args:
        q: `[Tq, Hq, d]`; k, v: `[Tk, Hkv, d]`, `Tk >= Tq`; optionally all with one leading batch dim.

    Returns:
        `[Tq, Hq, d]` (or `[B, Tq, Hq, d]`) in `q.dtype`.
    """
    Tq, Hq, _ = q.shape[-3:]
    Tk, Hkv, _ = k.shape[-3:]
    if Tk < Tq:
        raise ValueError(f"causal_gqa_attention: {Tk} keys for {Tq} queries")
    dtype = compute_dtype(ATTN_SOFTMAX_DTYPE, q.dtype)
    group = Hq // Hkv
    kh = k.to(dtype).repeat_interleave(group, dim=-2)  # [..., Tk, Hq, d]
    vh = v.to(dtype).repeat_interleave(group, dim=-2)
    scores = torch.einsum("...qhd,...khd->...hqk", q.to(dtype), kh) * scale
    query_pos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    key_pos = torch.arange(Tk, device=q.device)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("...hqk,...khd->...qhd", probs, vh).to(q.dtype)
