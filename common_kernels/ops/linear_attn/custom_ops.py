"""The engine-facing kernels as `torch.library` custom ops, so torch.compile and CUDA-graph capture see
them as single opaque ops that mutate the state pool in place (`ring_linear::...`)."""

from __future__ import annotations

import torch

from .decode import linear_attention_decode
from .prefill import linear_attention_prefill


@torch.library.custom_op("ring_linear::linear_attention_prefill", mutates_args=("state_pool",))
def linear_attention_prefill_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """`linear_attention_prefill` as a custom op (arguments as there; `fresh` is required)."""
    return linear_attention_prefill(
        q, k, v, decay_rate, scale, cu_seqlens, state_pool, slots, fresh, max_seqlen=max_seqlen
    )


@linear_attention_prefill_op.register_fake
def _(q, k, v, decay_rate, scale, cu_seqlens, state_pool, slots, fresh, max_seqlen=None):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))


@torch.library.custom_op("ring_linear::linear_attention_decode", mutates_args=("state_pool",))
def linear_attention_decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    tokens_per_seq: int = 1,
    fresh: torch.Tensor | None = None,
) -> torch.Tensor:
    """`linear_attention_decode` as a custom op (arguments as there)."""
    return linear_attention_decode(
        q, k, v, decay_rate, scale, state_pool, slots, tokens_per_seq=tokens_per_seq, fresh=fresh
    )


@linear_attention_decode_op.register_fake
def _(q, k, v, decay_rate, scale, state_pool, slots, tokens_per_seq=1, fresh=None):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
