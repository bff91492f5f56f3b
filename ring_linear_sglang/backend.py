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
from common_kernels.ops.linear_attn.aligned import linear_attention_aligned_decode
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
        self.aligned = aligned_mode()  # every token through the state one by one (`ops.linear_attn.aligned`)
        self._not_fresh = torch.zeros(0, dtype=torch.int8, device=self.device)  # aligned decode's flags, grown once
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

    def _state_pool(self, layer_id: int) -> torch.Tensor:
        return self.req_to_token_pool.mamba2_layer_cache(layer_id).temporal

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
        self.step.run(q, k, v, out, self.decay_rates[layer_id], self.scale, self._state_pool(layer_id))
        return out.view(q.shape[0], -1)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs) -> torch.Tensor:
        """One token per request in place on its slot; graph padding rows carry slot -1 and get zeros."""
        layer_id = layer.layer_id if layer is not None else kwargs["layer_id"]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        slots = self.forward_metadata.mamba_cache_indices[: q.shape[0]]
        rows = (q, k, v, self.decay_rates[layer_id], self.scale, self._state_pool(layer_id), slots)
        if self.aligned:  # no decode starts fresh: SGLang extends a new prompt, however short
            out = linear_attention_aligned_decode(*rows, self._decode_flags(q.shape[0]))
        else:
            out = linear_attention_decode(*rows)
        return out.view(q.shape[0], -1)

    def _decode_flags(self, rows: int) -> torch.Tensor:
        """`rows` zero "fresh" flags, sliced from one buffer that every layer and step shares (SGLang captures its
        largest decode graph first, so the buffer is grown there, not per layer and step)."""
        if self._not_fresh.shape[0] < rows:
            self._not_fresh = torch.zeros(rows, dtype=torch.int8, device=self.device)
        return self._not_fresh[:rows]


def _host_offsets(extend_seq_lens_cpu) -> list[int]:
    offsets = [0]
    for length in extend_seq_lens_cpu:
        offsets.append(offsets[-1] + int(length))
    return offsets
