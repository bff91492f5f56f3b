"""The linear-attention backend: vLLM's batch metadata mapped onto the engine-neutral step object
(`common_kernels.serving.LinearAttentionStep`), built on the device with no host synchronisation (decodes
first, then prefills, each routed to its own state slot)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.linear_attn import (
    BailingLinearAttentionBackend,
    BailingLinearAttentionMetadata,
    BailingLinearAttentionMetadataBuilder,
)

from common_kernels.serving import LinearAttentionStep, aligned_mode, build_step


@dataclass
class RingLinearMetadata(BailingLinearAttentionMetadata):
    """vLLM's Bailing metadata (decode slots padded with -1 for full CUDA graphs, prefill slots) plus the step
    the layers run."""

    step: LinearAttentionStep | None = None


class RingLinearMetadataBuilder(BailingLinearAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # persistent, so a captured decode graph reads this step's flags
        self.decode_fresh_buffer = torch.zeros(self.decode_cudagraph_max_bs, dtype=torch.int8, device=device)
        self.aligned = aligned_mode()
        if self.aligned:  # the window form's start positions, likewise
            self.decode_starts_buffer = torch.zeros(self.decode_cudagraph_max_bs, dtype=torch.int64, device=device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False, **kwargs) -> RingLinearMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        slots_d = base.state_indices_tensor_d if base.num_decodes > 0 else None
        # full-CUDA-graph decode: the base hands out its persistent slot buffer; the flags follow it
        graph_buffer = _same_storage(slots_d, self.decode_legacy_state_indices_tensor)
        if graph_buffer != self._replayable_decode(base):
            raise RuntimeError(
                "ring-linear: vLLM's linear-attention builder no longer hands a full-CUDA-graph decode batch its "
                "persistent slot buffer (or hands it to other batches); a captured graph would read another step's "
                "slots and flags. This vLLM version is not supported: report it with `vllm --version`"
            )
        heads, _, head_dim_v = self.kv_cache_spec.shapes[0][-3:]  # an entry of stacked states leads with its rows
        step = build_step(
            common_attn_metadata.query_start_loc,
            common_attn_metadata.seq_lens,
            base.num_decodes,
            base.num_prefills,
            base.num_decode_tokens,
            base.num_prefill_tokens,
            slots_d,
            base.state_indices_tensor_p if base.num_prefills > 0 else None,
            heads,
            head_dim_v,
            common_attn_metadata.max_query_len,
            query_start_loc_host=_host_offsets(common_attn_metadata),
            decode_fresh_buffer=self.decode_fresh_buffer if graph_buffer else None,
            aligned=self.aligned,
            decode_starts_buffer=self.decode_starts_buffer if graph_buffer and self.aligned else None,
        )
        return RingLinearMetadata(**fields, step=step)

    def _replayable_decode(self, base) -> bool:
        """Whether vLLM may replay this batch in a full CUDA graph: decodes only, within the captured sizes."""
        mode = self.compilation_config.cudagraph_mode
        full = mode is not None and mode.has_full_cudagraphs()
        return full and base.num_prefills == 0 and 0 < base.num_decodes <= self.decode_cudagraph_max_bs


def _host_offsets(common_attn_metadata) -> list[int] | None:
    host = getattr(common_attn_metadata, "query_start_loc_cpu", None)
    return None if host is None else host.tolist()


def _same_storage(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class RingLinearBackend(BailingLinearAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "RING_LINEAR_ATTN"

    @staticmethod
    def get_builder_cls() -> type[RingLinearMetadataBuilder]:
        return RingLinearMetadataBuilder

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        """In aligned mode (`RING_LINEAR_ALIGNED=1`) a request's result does not depend on its batch."""
        return aligned_mode()
