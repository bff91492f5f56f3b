"""Aligned mode's linear attention: what an engine in aligned mode computes for a request, as one call a trainer
can make.

An aligned engine prefills a request's prompt with the aligned prefill (`plan_prefill(aligned=True)` on the
`ALIGNED_SEGMENT` grid: the same bits alone or in any batch, in one pass or in chunks stopped on the grid), then
decodes each generated token in its own step with a fixed V-tile (`ALIGNED_DECODE_BLOCK_V`; the default picks the
tile from the batch size, and the tile sets the order of the output's sum). A one-token prompt is a decode from
a zero state (vLLM schedules it as one; SGLang would prefill it, and refuses aligned mode for now).
`linear_attention_as_served` does the same: the prompts through the aligned prefill, the generated tokens of each
sequence through the decode kernel in one launch, which runs them through the state in order with the arithmetic
of that many steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backward import linear_attention_varlen_triton
from .decode import linear_attention_decode
from .prefill import SegmentPlan, linear_attention_prefill, plan_prefill

ALIGNED_SEGMENT = 64  # divides vLLM's align-mode blocks (512 tokens on Ring-mini), where its prefill chunks stop
ALIGNED_DECODE_BLOCK_V = 64


def aligned_decode_block_v(head_dim_v: int) -> int:
    """The decode's V-tile in aligned mode, whatever the batch."""
    return min(ALIGNED_DECODE_BLOCK_V, head_dim_v)


def aligned_plan(cu_seqlens: torch.Tensor, total_tokens: int, num_heads: int, head_dim_v: int) -> SegmentPlan:
    """Aligned mode's prefill plan: `ALIGNED_SEGMENT` segments from each sequence's first token, whatever the batch."""
    return plan_prefill(cu_seqlens, total_tokens, num_heads, head_dim_v, segment_size=ALIGNED_SEGMENT, aligned=True)


def served_split(offsets: Sequence[int], prompt_lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """Each sequence's `(start, first decoded row, end)`: rows before the second are prefilled, the rest decoded.

    Raises ValueError naming the sequence when a prompt length is not in `[1, sequence length]`."""
    if len(prompt_lengths) != len(offsets) - 1:
        raise ValueError(f"prompt_lengths has {len(prompt_lengths)} entries for {len(offsets) - 1} sequences")
    split = []
    for n, (start, end, prompt) in enumerate(zip(offsets[:-1], offsets[1:], prompt_lengths, strict=True)):
        if not 1 <= prompt <= end - start:
            raise ValueError(f"prompt_lengths[{n}] = {prompt}: a prompt holds 1 to {end - start} tokens (its sequence)")
        split.append((start, start if prompt == 1 else start + prompt, end))
    return split


def _as_served(q, k, v, decay_rate, scale, offsets, prompt_lengths) -> torch.Tensor:
    T, H, _ = q.shape
    V = v.shape[-1]
    split = served_split(offsets, prompt_lengths)
    out = torch.zeros((T, H, V), dtype=q.dtype, device=q.device)
    pool = torch.zeros((len(split), H, q.shape[-1], V), dtype=torch.float32, device=q.device)
    prefilled = [(n, a, b) for n, (a, b, _) in enumerate(split) if b > a]
    if prefilled:
        rows = torch.cat([torch.arange(a, b, device=q.device) for _, a, b in prefilled])
        lengths = torch.tensor([0] + [b - a for _, a, b in prefilled], device=q.device)
        cu = lengths.cumsum(0).to(torch.int32)
        slots = torch.tensor([n for n, _, _ in prefilled], dtype=torch.int32, device=q.device)
        plan = aligned_plan(cu, rows.numel(), H, V)
        out[rows] = linear_attention_prefill(
            q[rows], k[rows], v[rows], decay_rate, scale, cu, pool, slots, plan=plan
        )  # fmt: skip
    for n, (start, first, end) in enumerate(split):
        if end > first:
            slot = torch.tensor([n], dtype=torch.int32, device=q.device)
            fresh = torch.tensor([int(first == start)], dtype=torch.int8, device=q.device)
            out[first:end] = linear_attention_decode(
                q[first:end], k[first:end], v[first:end], decay_rate, scale, pool, slot, tokens_per_seq=end - first,
                fresh=fresh, block_v=aligned_decode_block_v(V),
            )  # fmt: skip
    return out


class _AsServed(torch.autograd.Function):
    """Forward: as served. Backward: the gradient of the standard varlen prefill (the same function of q, k, v up
    to rounding), recomputed."""

    @staticmethod
    def forward(ctx, q, k, v, decay_rate, scale, offsets, prompt_lengths):
        ctx.save_for_backward(q, k, v, decay_rate)
        ctx.scale, ctx.offsets = scale, offsets
        return _as_served(q, k, v, decay_rate, scale, offsets, prompt_lengths)

    @staticmethod
    def backward(ctx, do):
        q, k, v, decay_rate = ctx.saved_tensors
        leaves = [t.detach().to(q.dtype).requires_grad_() for t in (q, k, v)]  # a 16-bit v widened, exactly
        cu = torch.tensor(ctx.offsets, dtype=torch.int32, device=q.device)
        with torch.enable_grad():
            o, _ = linear_attention_varlen_triton(*leaves, decay_rate, ctx.scale, cu)
            dq, dk, dv = torch.autograd.grad(o, leaves, do)
        return dq, dk, dv.to(v.dtype), None, None, None, None


def linear_attention_as_served(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    offsets: Sequence[int],
    prompt_lengths: Sequence[int],
) -> torch.Tensor:
    """Packed sequences computed as an aligned engine computes them: each sequence's first `prompt_lengths[n]`
    tokens prefilled, the rest decoded one by one, every sequence from a zero state.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`, as the engine's layer makes them (same dtypes, same values).
        decay_rate: `[H]`; scale: multiplies q.
        offsets: `[N+1]` host offsets of the sequences; prompt_lengths: `[N]`, each in `[1, sequence length]`.

    Returns:
        o `[T, H, V]` in the dtype of q; differentiable (the backward is the standard prefill's).
    """
    return _AsServed.apply(q, k, v, decay_rate, scale, list(offsets), list(prompt_lengths))
