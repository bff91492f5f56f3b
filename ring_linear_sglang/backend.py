"""Ring-linear's linear-attention backend for SGLang: SGLang's per-forward metadata (one state slot per request,
padded rows -1) mapped onto the engine-neutral step, and our kernels on SGLang's state pool.

SGLang's hybrid wrapper routes the linear layers here and the softmax layers to its own attention backend. An
extend batch runs as one varlen prefill over all its requests (each from its slot, or from zero when it has no
cached prefix); a decode batch advances every slot in place, also under SGLang's decode CUDA graphs, whose
static slot buffers the base class keeps. q and k come in fp32, v may stay in the model dtype; nothing is cast
to the KV-cache dtype.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.hybrid_linear_attn_backend import MambaAttnBackendBase
from sglang.srt.runtime_context import get_parallel

from common_kernels.ops.linear_attn import linear_attention_decode
from common_kernels.ops.linear_attn.windowed import WINDOW, linear_attention_windowed_decode
from common_kernels.serving import (
    LinearAttentionStep,
    aligned_mode,
    build_step,
    rank_decay_rates,
    warm_up_linear_attention,
)


class RingLinearAttnBackend(MambaAttnBackendBase):
    def __init__(self, model_runner) -> None:
        super().__init__(model_runner)
        config = model_runner.model_config.hf_config
        parallel = get_parallel()
        tp_size, tp_rank = parallel.attn_tp_size, parallel.attn_tp_rank
        self.num_heads = config.num_attention_heads // tp_size
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.decay_rates = {
            layer: rank_decay_rates(config, layer, tp_size, tp_rank, self.device) for layer in config.linear_layer_ids
        }
        self.step: LinearAttentionStep | None = None
        self.aligned = aligned_mode()  # the window form on the absolute grid (`ops.linear_attn.windowed`)
        # aligned decode's zero "fresh" flags, grown once (SGLang captures its largest decode graph first)
        self._not_fresh = torch.zeros(0, dtype=torch.int8, device=self.device)
        self._layer_pools: dict[int, tuple[torch.Tensor, ...]] = {}  # `_pools`: the pool's views, made once a layer
        self._warm_up(model_runner)

    def _warm_up(self, model_runner) -> None:
        """Compile every kernel variant before the first request (on scratch state; the pool is not touched)."""
        rows = 64
        q = torch.zeros((rows, self.num_heads, self.head_dim), dtype=torch.float32, device=self.device)
        v = torch.zeros_like(q, dtype=model_runner.dtype)
        state_dtype = self.req_to_token_pool.mamba2_layer_cache(min(self.decay_rates)).temporal.dtype
        slot_dtype = self.req_to_token_pool.req_index_to_mamba_index_mapping.dtype
        rates = next(iter(self.decay_rates.values()))
        warm_up_linear_attention(
            q, q, v, rates, self.scale, state_dtype, max_num_seqs=4, slot_dtype=slot_dtype, aligned=self.aligned
        )

    def init_forward_metadata(self, forward_batch) -> None:
        """The slots (base class), and for an extend batch the step every linear layer of this forward runs."""
        super().init_forward_metadata(forward_batch)
        self.step = None
        mode = forward_batch.forward_mode
        if mode.is_extend() and not mode.is_target_verify():
            self.step = self._extend_step(forward_batch)

    def _extend_step(self, forward_batch) -> LinearAttentionStep:
        metadata = self.forward_metadata
        if metadata.has_mamba_track_mask:
            raise NotImplementedError(
                "ring-linear: SGLang asked for mamba state snapshots (radix 'extra_buffer' mode), which this backend "
                "does not write; the settings check should have refused --mamba-radix-cache-strategy extra_buffer"
            )
        query_start = metadata.query_start_loc
        num_requests = query_start.shape[0] - 1
        # seq_lens == query_lens marks a request with no cached prefix: it starts from a zero state
        seq_lens = forward_batch.extend_prefix_lens[:num_requests] + (query_start[1:] - query_start[:-1])
        return build_step(
            query_start,
            seq_lens,
            num_decodes=0,
            num_prefills=num_requests,
            num_decode_tokens=0,
            num_prefill_tokens=int(forward_batch.extend_num_tokens),
            decode_slots=None,
            prefill_slots=metadata.mamba_cache_indices[:num_requests],
            num_heads=self.num_heads,
            head_dim_v=self.head_dim,
            max_query_len=max(forward_batch.extend_seq_lens_cpu),
            query_start_loc_host=_host_offsets(forward_batch.extend_seq_lens_cpu),
            aligned=self.aligned,
        )

    def _pools(self, layer_id: int) -> tuple[torch.Tensor, ...]:
        """The layer's state pool, and in aligned mode its window buffers (`window_buffers`), checked and viewed on
        the layer's first step only (SGLang allocates its pool once)."""
        if layer_id not in self._layer_pools:
            cache = self.req_to_token_pool.mamba2_layer_cache(layer_id)
            d = self.head_dim
            windows = window_buffers(cache.conv[0], self.num_heads, d, d) if self.aligned else ()
            self._layer_pools[layer_id] = (cache.temporal, *windows)
        return self._layer_pools[layer_id]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.num_heads, self.head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs) -> torch.Tensor:
        layer_id = layer.layer_id if layer is not None else kwargs["layer_id"]
        if self.step is None:
            raise NotImplementedError(
                f"ring-linear: the linear-attention backend cannot run {forward_batch.forward_mode} batches "
                "(speculative verification is refused at launch)"
            )
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        out = q.new_empty(q.shape)
        self.step.run(q, k, v, out, self.decay_rates[layer_id], self.scale, *self._pools(layer_id))
        return out.view(q.shape[0], -1)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs) -> torch.Tensor:
        """One token per request in place on its slot; graph padding rows carry slot -1 and get zeros."""
        layer_id = layer.layer_id if layer is not None else kwargs["layer_id"]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        rows = q.shape[0]
        slots = self.forward_metadata.mamba_cache_indices[:rows]
        if not self.aligned:
            out = linear_attention_decode(
                q, k, v, self.decay_rates[layer_id], self.scale, self._pools(layer_id)[0], slots
            )
            return out.view(rows, -1)
        # no decode starts fresh (SGLang extends a new prompt, however short); each row is one token at position
        # seq_len - 1 (read from the batch's own buffer, so a captured graph reads each replay's lengths)
        self._grow_decode_buffers(rows)
        starts = (forward_batch.seq_lens[:rows] - 1).to(torch.int64)
        out = linear_attention_windowed_decode(
            q,
            k,
            v,
            self.decay_rates[layer_id],
            self.scale,
            starts,
            *self._pools(layer_id),
            slots,
            self._not_fresh[:rows],
        )
        return out.view(rows, -1)

    def _grow_decode_buffers(self, rows: int) -> None:
        """The decode's zero "fresh" flags, sliced from a buffer every layer and step shares."""
        if self._not_fresh.shape[0] < rows:
            self._not_fresh = torch.zeros(rows, dtype=torch.int8, device=self.device)


def window_buffers(conv: torch.Tensor, heads: int, d_k: int, d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned mode's window buffers in SGLang's fp32 conv state of one layer (`[slots, heads * (d_k + d_v),
    WINDOW]`, `RingLinearSGLangConfig.mamba2_cache_params`): each slot's memory as `[heads, WINDOW * (d_k + d_v)]`,
    the keys `[slots, heads, WINDOW, d_k]` first, then the values `[slots, heads, WINDOW, d_v]`."""
    slots = conv.shape[0]
    if conv.dtype != torch.float32 or conv[0].numel() != heads * WINDOW * (d_k + d_v) or not conv.is_contiguous():
        raise RuntimeError(
            f"ring-linear: SGLang's conv state {conv.dtype} {tuple(conv.shape)} is not the fp32 window buffer aligned "
            f"mode declared ([slots, {heads * (d_k + d_v)}, {WINDOW}]); this SGLang version is not supported in "
            "aligned mode"
        )
    raw = conv.view(slots, heads, WINDOW * (d_k + d_v))
    return raw[..., : WINDOW * d_k].view(slots, heads, WINDOW, d_k), raw[..., WINDOW * d_k :].view(
        slots, heads, WINDOW, d_v
    )


def _host_offsets(extend_seq_lens_cpu) -> list[int]:
    offsets = [0]
    for length in extend_seq_lens_cpu:
        offsets.append(offsets[-1] + int(length))
    return offsets
