"""The linear-attention backend: per-step metadata that lets one layer call run a mixed batch with no
host synchronisation (decodes first, then prefills, each routed to its own state slot). What every linear
layer of a step would otherwise recompute (the prefill's segment tables, the RoPE table) is made once here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.linear_attn import (
    BailingLinearAttentionBackend,
    BailingLinearAttentionMetadata,
    BailingLinearAttentionMetadataBuilder,
)

from common_kernels.ops.linear_attn import SegmentPlan, plan_prefill


@dataclass
class RingLinearMetadata(BailingLinearAttentionMetadata):
    """vLLM's Bailing metadata (decode slots padded with -1 for full CUDA graphs, prefill slots) plus what
    the varlen prefill and the decode kernels need, all built on the device."""

    prefill_cu_seqlens: torch.Tensor | None = None  # [P+1] int32 offsets into the prefill tokens
    prefill_fresh: torch.Tensor | None = None  # [P] int8: 1 = first chunk of a request (zero state)
    decode_fresh: torch.Tensor | None = None  # [num_decodes] int8: 1 = a one-token prompt (zero state)
    prefill_plan: SegmentPlan | None = None  # the prefill's segment tables, shared by the step's linear layers
    rope_cos_sin: tuple[bool, torch.Tensor, torch.Tensor] | None = None  # (made under capture, cos, sin)


class RingLinearMetadataBuilder(BailingLinearAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # persistent, so a captured decode graph reads this step's flags
        self.decode_fresh_buffer = torch.zeros(self.decode_cudagraph_max_bs, dtype=torch.int8, device=device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False, **kwargs) -> RingLinearMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        D, P = base.num_decodes, base.num_prefills
        query_start = common_attn_metadata.query_start_loc
        query_lens = query_start[1:] - query_start[:-1]
        # a request whose tokens are all new (no context) starts from a zero state, whatever its slot holds
        is_fresh = (common_attn_metadata.seq_lens[: D + P] == query_lens[: D + P]).to(torch.int8)
        decode_fresh = is_fresh[:D]
        slots_d = base.state_indices_tensor_d
        if _same_storage(slots_d, self.decode_legacy_state_indices_tensor):
            # full-CUDA-graph decode: the base handed out its persistent slot buffer; the flags follow it
            self.decode_fresh_buffer[:D].copy_(decode_fresh, non_blocking=True)
            self.decode_fresh_buffer[D : slots_d.shape[0]] = 0
            decode_fresh = self.decode_fresh_buffer[: slots_d.shape[0]]
        prefill_cu = prefill_fresh = prefill_plan = None
        if P > 0:
            starts = query_start[D : D + P + 1]
            prefill_cu = (starts - starts[0]).to(torch.int32)
            prefill_fresh = is_fresh[D : D + P]
            heads, _, head_dim_v = self.kv_cache_spec.shapes[0]
            prefill_plan = plan_prefill(
                prefill_cu, base.num_prefill_tokens, heads, head_dim_v, max_seqlen=common_attn_metadata.max_query_len
            )
        return RingLinearMetadata(
            **fields,
            prefill_cu_seqlens=prefill_cu,
            prefill_fresh=prefill_fresh,
            decode_fresh=decode_fresh,
            prefill_plan=prefill_plan,
        )


def _same_storage(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class RingLinearBackend(BailingLinearAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "RING_LINEAR_ATTN"

    @staticmethod
    def get_builder_cls() -> type[RingLinearMetadataBuilder]:
        return RingLinearMetadataBuilder
