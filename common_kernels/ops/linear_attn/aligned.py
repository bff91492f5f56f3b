"""Aligned mode's linear attention: every token through its sequence's state one at a time, prompt and generated
tokens alike, with one fixed V-tile, so a token's bits depend on nothing but its sequence.

The engines' default prefill cuts a step's prompts into segments sized by the batch and sums segment states in an
order set by where a chunk starts: a trainer could not know either. Run token by token instead, a token's result
is the same whether the engine prefilled it in one step or in chunks stopped anywhere (chunked prefill, a
prefix-cache hit), decoded it, or served it alone or in any batch; and it is what the shim computes over the whole
sequence in one launch (`linear_attention_as_served`). Prefill and decode are one compiled kernel
(`decode._decode_kernel`, varlen or fixed-length by a runtime argument).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backward import linear_attention_varlen_triton
from .decode import linear_attention_decode

ALIGNED_BLOCK_V = 16  # aligned mode's one V-tile: the tile sets the output sum's order; 16 columns keep 8 programs
# per head busy on a single long prompt


def aligned_block_v(head_dim_v: int) -> int:
    """The V-tile of aligned mode's kernel, whatever the batch."""
    return min(ALIGNED_BLOCK_V, head_dim_v)


def linear_attention_aligned(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aligned mode's prefill: each sequence's rows `cu_seqlens[b] .. cu_seqlens[b+1] - 1` through its state in
    `state_pool[slots[b]]` token by token (`fresh[b]` nonzero: from zero), in place; `linear_attention_decode`'s
    contract otherwise. Its decode is `linear_attention_decode(..., block_v=aligned_block_v(V))` with `fresh`
    flags (the same compiled variant: pass `fresh` here too)."""
    return linear_attention_decode(
        q, k, v, decay_rate, scale, state_pool, slots, fresh=fresh, out=out, block_v=aligned_block_v(v.shape[-1]),
        cu_seqlens=cu_seqlens,
    )  # fmt: skip


class _AsServed(torch.autograd.Function):
    """Forward: as an aligned engine serves it. Backward: the gradient of the standard varlen prefill (the same
    function of q, k, v up to rounding), recomputed."""

    @staticmethod
    def forward(ctx, q, k, v, decay_rate, scale, offsets):
        ctx.save_for_backward(q, k, v, decay_rate)
        ctx.scale, ctx.offsets = scale, offsets
        T, H, K = q.shape
        N = len(offsets) - 1
        pool = torch.zeros((N, H, K, v.shape[-1]), dtype=torch.float32, device=q.device)
        cu = torch.tensor(offsets, dtype=torch.int32, device=q.device)
        slots = torch.arange(N, dtype=torch.int32, device=q.device)
        fresh = torch.ones(N, dtype=torch.int8, device=q.device)  # the engine's flags, so its compiled variant
        return linear_attention_aligned(q, k, v, decay_rate, scale, cu, pool, slots, fresh)

    @staticmethod
    def backward(ctx, do):
        q, k, v, decay_rate = ctx.saved_tensors
        leaves = [t.detach().to(q.dtype).requires_grad_() for t in (q, k, v)]  # a 16-bit v widened, exactly
        cu = torch.tensor(ctx.offsets, dtype=torch.int32, device=q.device)
        with torch.enable_grad():
            o, _ = linear_attention_varlen_triton(*leaves, decay_rate, ctx.scale, cu)
            dq, dk, dv = torch.autograd.grad(o, leaves, do)
        return dq, dk, dv.to(v.dtype), None, None, None


def linear_attention_as_served(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    offsets: Sequence[int],
) -> torch.Tensor:
    """Packed sequences computed as an aligned engine computes them, each from a zero state: the same bits as the
    engine's, however it split the sequence into prefill chunks and decode steps.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`, as the engine's layer makes them (same dtypes, same values).
        decay_rate: `[H]`; scale: multiplies q.
        offsets: `[N+1]` host offsets of the sequences, from 0 to T.

    Returns:
        o `[T, H, V]` in the dtype of q; differentiable (the backward is the standard prefill's).
    """
    offsets = list(offsets)
    if not offsets or offsets[0] != 0 or offsets[-1] != q.shape[0] or any(map(int.__gt__, offsets, offsets[1:])):
        raise ValueError(f"linear_attention_as_served: offsets must rise from 0 to {q.shape[0]} (the rows of q)")
    return _AsServed.apply(q, k, v, decay_rate, scale, offsets)
