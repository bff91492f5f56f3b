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
from ..ops.linear_attn.windowed import linear_attention_windowed, linear_attention_windowed_decode


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
    aligned: bool = False  # aligned mode: the window form on the absolute grid (`ops.linear_attn.windowed`)
    decode_starts: torch.Tensor | None = None  # aligned: [B] int64, each decode's tokens before this step
    prefill_starts: torch.Tensor | None = None  # aligned: [P] int64, each prefill's tokens before this step

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
        window_k: torch.Tensor | None = None,
        window_v: torch.Tensor | None = None,
    ) -> None:
        """Write the step's attention output into `out` `[>= num_tokens, H, V]`, advancing the pool's states (and,
        in aligned mode, the window buffers `window_k` `[P, H, WINDOW, K]`, `window_v` `[P, H, WINDOW, V]`)."""
        if self.aligned and (window_k is None or window_v is None):
            raise ValueError("ring-linear: an aligned step needs the layer's window buffers (window_k, window_v)")
        nd, nt = self.num_decode_tokens, self.num_tokens
        padded = 0
        if self.decode_slots is not None and self.decode_slots.shape[0] > 0:
            padded = self.decode_slots.shape[0]
            qkv = (q[:padded], k[:padded], v[:padded], decay_rate, scale)
            if self.aligned:
                linear_attention_windowed_decode(
                    *qkv, self.decode_starts, state_pool, window_k, window_v, self.decode_slots, self.decode_fresh,
                    out=out[:padded],
                )  # fmt: skip
            else:
                linear_attention_decode(*qkv, state_pool, self.decode_slots, fresh=self.decode_fresh, out=out[:padded])
        out[padded:nd].zero_()
        if self.num_prefill_tokens > 0:
            qkv = (q[nd:nt], k[nd:nt], v[nd:nt], decay_rate, scale, self.prefill_cu_seqlens)
            if self.aligned:
                linear_attention_windowed(
                    *qkv, self.prefill_starts, state_pool, window_k, window_v, self.prefill_slots, self.prefill_fresh,
                    out=out[nd:nt],
                )  # fmt: skip
            else:
                linear_attention_prefill(
                    *qkv, state_pool, self.prefill_slots, self.prefill_fresh, plan=self.prefill_plan, out=out[nd:nt]
                )
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
    decode_starts_buffer: torch.Tensor | None = None,
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
        decode_starts_buffer: aligned mode's persistent `[>= B]` int64 buffer of the decodes' start positions, for a
            captured decode graph, as `decode_fresh_buffer`.
    """
    R = num_decodes + num_prefills
    query_lens = query_start_loc[1 : R + 1] - query_start_loc[:R]
    is_fresh = (seq_lens[:R] == query_lens).to(torch.int8)
    # each request's tokens before this step: aligned mode's only (every op here runs once per KV-cache group a step)
    positions = (seq_lens[:R] - query_lens).to(torch.int64) if aligned else None
    step = LinearAttentionStep(num_decode_tokens, num_prefill_tokens, decode_slots=decode_slots, aligned=aligned)
    if decode_slots is not None:
        B = decode_slots.shape[0]
        step.decode_fresh = _padded(is_fresh[:num_decodes], B, decode_fresh_buffer)
        if aligned:
            step.decode_starts = _padded(positions[:num_decodes], B, decode_starts_buffer)
    if num_prefills > 0:
        starts = query_start_loc[num_decodes : R + 1]
        step.prefill_cu_seqlens = (starts - starts[0]).to(torch.int32)
        step.prefill_slots = prefill_slots
        step.prefill_fresh = is_fresh[num_decodes:R]
        if aligned:
            step.prefill_starts = positions[num_decodes:R]
        else:
            host = None if query_start_loc_host is None else tuple(query_start_loc_host[num_decodes : R + 1])
            step.prefill_plan = _shared_plan(
                host, step.prefill_cu_seqlens, num_prefill_tokens, num_heads, head_dim_v, max_query_len
            )
    return step


def _padded(values: torch.Tensor, rows: int, buffer: torch.Tensor | None) -> torch.Tensor:
    """`values` followed by zeros up to `rows` (a CUDA graph's padding), written into `buffer` when given (the fixed
    address a captured graph reads)."""
    n = values.shape[0]
    if buffer is not None:
        buffer[:n].copy_(values, non_blocking=True)
        buffer[n:rows] = 0
        return buffer[:rows]
    if rows != n:
        return torch.cat([values, values.new_zeros(rows - n)])
    return values


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
