"""Aligned mode's softmax attention in vLLM: its Triton backend (KV-cache layout, cache writes, metadata) with our
kernel in place of `unified_attention`, the one the shim runs too (`common_kernels.ops.attention.aligned`), so a
request's attention output is the shim's bits whether it was prefilled, decoded, alone or in a batch."""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from common_kernels.ops.attention.aligned import BLOCK_N as KEY_TILE
from common_kernels.ops.attention.aligned import paged_attention_aligned


class RingAlignedAttentionImpl(TritonAttentionImpl):
    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("ring-linear: aligned attention does not quantize its output")
        if attn_metadata is None:  # the profiling run: compile the kernel now, not at a user's first request
            self._warm_up(query)
            return output.fill_(0)
        key_cache, value_cache = self._key_value_caches(kv_cache)
        n = attn_metadata.num_actual_tokens
        paged_attention_aligned(
            query[:n].view(n, self.num_heads, self.head_size),
            key_cache,
            value_cache,
            attn_metadata.query_start_loc,
            attn_metadata.seq_lens,
            attn_metadata.block_table,
            self.scale,
            attn_metadata.max_query_len,
            out=output.view(-1, self.num_heads, self.head_size),
        )
        return output

    def _key_value_caches(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[pages, page_size, kv_heads, head_size]` views of the backend's `[pages, kv_heads, page_size, 2 x
        head_size]` cache."""
        if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * self.head_size:
            raise RuntimeError(
                f"ring-linear: vLLM's Triton KV cache is no longer [blocks, kv_heads, block_size, 2 x head_size] "
                f"(got {tuple(kv_cache.shape)}); this vLLM version is not supported in aligned mode"
            )
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        return key_cache, value_cache

    def _warm_up(self, query: torch.Tensor) -> None:
        """One query over a one-page cache of this layer's layout and dtype, for each of the kernel's two serving
        variants: pages that hold whole key tiles (a hybrid model's large blocks) and pages that do not. Each index
        tensor is its own allocation, aligned as vLLM's buffers are (Triton compiles a variant per pointer
        alignment: a view one element in would compile another)."""
        device, ints = query.device, {"dtype": torch.int32, "device": query.device}
        q = torch.zeros((1, self.num_heads, self.head_size), dtype=query.dtype, device=device)
        query_start, seq_lens = torch.tensor([0, 1], **ints), torch.ones(1, **ints)
        for page in (16, KEY_TILE):
            shape = (1, self.num_kv_heads, page, 2 * self.head_size)  # the backend's logical layout (0.26 and 0.33)
            key_cache, value_cache = self._key_value_caches(torch.zeros(shape, dtype=query.dtype, device=device))
            table, out = torch.zeros((1, 1), **ints), q.clone()
            paged_attention_aligned(q, key_cache, value_cache, query_start, seq_lens, table, self.scale, 1, out=out)


class RingAlignedAttentionBackend(TritonAttentionBackend):
    """vLLM's Triton backend (and its name, which vLLM looks up in its backend enum) with our kernel."""

    @staticmethod
    def get_impl_cls() -> type[RingAlignedAttentionImpl]:
        return RingAlignedAttentionImpl

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size >= 16 and head_size & (head_size - 1) == 0
