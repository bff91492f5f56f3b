"""One engine step of linear-attention work, engine-neutral: what the vLLM and SGLang adapters map their
batch metadata onto, and the one place that runs it on the state pool.

A step holds its requests decodes first (one token each, padded with slot -1 for CUDA graphs), then
prefills (whole prompts or chunks, varlen). Every tensor lives on the device and is built without a host
synchronisation, so a step can be made inside a captured decode graph's metadata update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.linear_attn import SegmentPlan, linear_attention_decode, linear_attention_prefill, plan_prefill
from ..ops.linear_attn.aligned import linear_attention_aligned, linear_attention_aligned_decode


@dataclass
class LinearAttentionStep:
    """The rows of a step's q/k/v/output and the state slot each request reads and writes.

    Rows `[0, num_decode_tokens)` are decodes, the first `decode_slots.shape[0]` of them one per request
    (slot -1: graph padding, zero output); rows after them up to `num_decode_tokens` are padding too. Rows
    `[num_decode_tokens, num_tokens)` are prefills, delimited by `prefill_cu_seqlens`; anything past
    `num_tokens` (an engine's padded buffer) gets zeros.
    """

    num_decode_tokens: int
    num_prefill_tokens: int
    decode_slots: torch.Tensor | None = None  # [B] int pool slots, -1 = padding
    decode_fresh: torch.Tensor | None = None  # [B] int8, 1 = a one-token prompt (start from zero)
    prefill_cu_seqlens: torch.Tensor | None = None  # [P+1] int32 offsets into the prefill rows, from 0
    prefill_slots: torch.Tensor | None = None  # [P] int pool slots
    prefill_fresh: torch.Tensor | None = None  # [P] int8, 1 = the first chunk of a request (zero state)
    prefill_plan: SegmentPlan | None = None  # segment tables (they carry the segment length); None in aligned mode
    aligned: bool = False  # aligned mode: every token through the state one by one (`ops.linear_attn.aligned`)

    @property
    def num_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        decay_rate: torch.Tensor,
        scale: float,
        state_pool: torch.Tensor,
    ) -> None:
        """Write the step's attention output into `out` `[>= num_tokens, H, V]`, advancing the pool's states."""
        nd, nt = self.num_decode_tokens, self.num_tokens
        padded = 0
        if self.decode_slots is not None and self.decode_slots.shape[0] > 0:
            padded = self.decode_slots.shape[0]
            rows = (q[:padded], k[:padded], v[:padded], decay_rate, scale, state_pool, self.decode_slots)
            if self.aligned:
                linear_attention_aligned_decode(*rows, self.decode_fresh, out=out[:padded])
            else:
                linear_attention_decode(*rows, fresh=self.decode_fresh, out=out[:padded])
        out[padded:nd].zero_()
        if self.num_prefill_tokens > 0:
            rows = (q[nd:nt], k[nd:nt], v[nd:nt], decay_rate, scale, self.prefill_cu_seqlens, state_pool,
                    self.prefill_slots, self.prefill_fresh)  # fmt: skip
            if self.aligned:
                linear_attention_aligned(*rows, out=out[nd:nt])
            else:
                linear_attention_prefill(*rows, plan=self.prefill_plan, out=out[nd:nt])
        out[nt:].zero_()


def build_step(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    num_decodes: int,
    num_prefills: int,
    num_decode_tokens: int,
    num_prefill_tokens: int,
    decode_slots: torch.Tensor | None,
    prefill_slots: torch.Tensor | None,
    num_heads: int,
    head_dim_v: int,
    max_query_len: int,
    query_start_loc_host: list[int] | None = None,
    decode_fresh_buffer: torch.Tensor | None = None,
    aligned: bool = False,
) -> LinearAttentionStep:
    """A step from an engine's batch description (requests ordered decodes first).

    Args:
        query_start_loc: `[R+1]` device offsets of each request's new tokens; seq_lens: `[>= R]` device
            lengths including them (a request whose tokens are all new starts from a zero state).
        decode_slots: `[B]` slots of the decodes, B >= num_decodes when padded for a CUDA graph (-1).
        prefill_slots: `[num_prefills]` slots of the prefills.
        num_heads, head_dim_v: the state's per-rank shape, for the segment plan.
        max_query_len: the longest request of the step, known on the host (sizes the segments).
        query_start_loc_host: the same offsets on the host, when the engine has them: steps with equal
            prefill offsets reuse one segment plan (vLLM builds a step per KV-cache group).
        decode_fresh_buffer: a persistent `[>= B]` int8 buffer to write the decode flags into, where a
            captured decode graph reads them from a fixed address.
        aligned: aligned mode (`RING_LINEAR_ALIGNED`): each request's result independent of the batch and of where
            its prefill was split, equal to `linear_attention_as_served`.
    """
    R = num_decodes + num_prefills
    query_lens = query_start_loc[1 : R + 1] - query_start_loc[:R]
    is_fresh = (seq_lens[:R] == query_lens).to(torch.int8)
    step = LinearAttentionStep(num_decode_tokens, num_prefill_tokens, decode_slots=decode_slots, aligned=aligned)
    if decode_slots is not None:
        fresh = is_fresh[:num_decodes]
        if decode_fresh_buffer is not None:
            B = decode_slots.shape[0]
            decode_fresh_buffer[:num_decodes].copy_(fresh, non_blocking=True)
            decode_fresh_buffer[num_decodes:B] = 0
            fresh = decode_fresh_buffer[:B]
        elif decode_slots.shape[0] != num_decodes:
            fresh = torch.cat([fresh, fresh.new_zeros(decode_slots.shape[0] - num_decodes)])
        step.decode_fresh = fresh
    if num_prefills > 0:
        starts = query_start_loc[num_decodes : R + 1]
        step.prefill_cu_seqlens = (starts - starts[0]).to(torch.int32)
        step.prefill_slots = prefill_slots
        step.prefill_fresh = is_fresh[num_decodes:R]
        if not aligned:
            host = None if query_start_loc_host is None else tuple(query_start_loc_host[num_decodes : R + 1])
            step.prefill_plan = _shared_plan(
                host, step.prefill_cu_seqlens, num_prefill_tokens, num_heads, head_dim_v, max_query_len
            )
    return step


_last_plan: tuple[tuple, SegmentPlan] | None = None


def _shared_plan(host_starts, cu_seqlens, total_tokens, num_heads, head_dim_v, max_seqlen) -> SegmentPlan:
    """`plan_prefill`, reused while the prefill offsets stay the same: the plan is a pure function of them,
    so a repeat (the step's next KV-cache group) takes the tables already on the device."""
    global _last_plan
    key = host_starts and (host_starts, total_tokens, num_heads, head_dim_v, max_seqlen, cu_seqlens.device)
    if key is not None and _last_plan is not None and _last_plan[0] == key:
        return _last_plan[1]
    plan = plan_prefill(cu_seqlens, total_tokens, num_heads, head_dim_v, max_seqlen=max_seqlen)
    if key is not None:
        _last_plan = (key, plan)
    return plan
