"""Aligned mode on SGLang: where SGLang's layers would pick kernels by the batch, the shim's kernels instead.

- Softmax attention: K/V written into SGLang's token pool at the step's cache locations, then the aligned kernel
  (`common_kernels.ops.attention.aligned`) over each request's pool rows (`req_to_token`, pages of one token), the
  same bits as the shim's packed call, in extends, decodes and SGLang's decode CUDA graphs (no host sync; a decode's
  grid is fixed by its batch size).
- LM head: the fixed-tile GEMM (`RingLinearForCausalLM.logits(aligned=True)`), through the hook SGLang's
  `LogitsProcessor` keeps for an LM head's own `quant_method`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common_kernels.ops.attention.aligned import paged_attention_aligned
from common_kernels.ops.moe.router_gemm import router_logits


def attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch) -> torch.Tensor:
    """`[T, Hq * d]` attention output of a `RadixAttention` layer's step (`attn` gives its layer id, heads, scale)."""
    from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool

    Hq, Hkv, d = attn.tp_q_head_num, attn.tp_k_head_num, attn.head_dim
    pool = get_token_to_kv_pool()
    pool.set_kv_buffer(attn, forward_batch.out_cache_loc, k.view(-1, Hkv, d), v.view(-1, Hkv, d))
    key_cache, value_cache = pool.get_key_buffer(attn.layer_id), pool.get_value_buffer(attn.layer_id)
    rows = forward_batch.req_pool_indices  # each request's row of `req_to_token`, read in the kernel (no gather)
    batch = rows.shape[0]
    if forward_batch.forward_mode.is_decode_or_idle():
        cu_seqlens_q, max_query_len = torch.arange(batch + 1, dtype=torch.int32, device=q.device), 1
    else:
        cu_seqlens_q = F.pad(forward_batch.extend_seq_lens.cumsum(0), (1, 0)).to(torch.int32)
        max_query_len = max(forward_batch.extend_seq_lens_cpu, default=0)
    out = paged_attention_aligned(
        q.view(-1, Hq, d), key_cache[:, None], value_cache[:, None], cu_seqlens_q, forward_batch.seq_lens,
        get_req_to_token_pool().req_to_token, attn.scaling, max_query_len, table_rows=rows,
    )  # fmt: skip
    return out.view(-1, Hq * d)


class AlignedLMHeadMethod:
    """An LM head's `quant_method` as SGLang's `LogitsProcessor` calls it: logits from the aligned fixed-tile GEMM."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is not None:
            raise NotImplementedError("ring-linear: aligned mode's LM head has no bias")
        return router_logits(x, layer.weight, invariant=True)


class AlignedLMHead:
    """The LM head's weight (the parameter itself, tied or not) behind `AlignedLMHeadMethod`; a plain object, so the
    model does not register the weight twice."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.quant_method = AlignedLMHeadMethod()

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight
