"""Start-up work for an engine's linear layers: compile every kernel variant a step can launch, and take the
prefill's largest scratch once, so the engine's memory profile counts it. Likewise aligned mode's expert tiers
(`warm_up_expert_tiers`).

The kernels take every batch-dependent integer as an unspecialised argument, so the variants are few: the
prefill (one per q/k/v dtype pair, and its one-launch form where that is on), and the decode with narrow and
wide V-tiles (small and large batches). Engines call `warm_up_linear_attention` from their profiling forward (no
batch metadata yet); a request never waits for a Triton compile.
"""

from __future__ import annotations

import torch

from ..ops.linear_attn import linear_attention_decode, linear_attention_prefill, plan_prefill, prefill
from ..ops.linear_attn.decode import wide_tile_min_rows
from ..ops.linear_attn.windowed import WINDOW, linear_attention_windowed, linear_attention_windowed_decode
from ..ops.moe import aligned as moe_aligned

_warmed: set[tuple] = set()


def warm_up_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    state_dtype: torch.dtype,
    max_num_seqs: int,
    out: torch.Tensor | None = None,
    slot_dtype: torch.dtype = torch.int32,
    aligned: bool = False,
) -> None:
    """Run the prefill over the rows of a profiling step (`q`/`k`/`v` `[T, H, d]`, as a layer makes them)
    split into `min(max_num_seqs, T)` sequences, its largest scratch (one partial segment per sequence),
    and, once per process and shape, the decode's variants. Nothing touches a state pool: every slot is -1.
    The prefill's output goes to `out` when given (the profiling forward's result), else it is dropped.
    `slot_dtype` is the engine's slot-index dtype (pointer types are part of a compiled variant). `aligned`: the
    engine serves in aligned mode, whose prefill (three passes, with their scratch) and decode are the window
    form's kernels (`ops.linear_attn.windowed`), and nothing else is compiled. The default decode is compiled
    with and without flags (vLLM passes them, SGLang does not)."""
    T, H, K = q.shape
    V = v.shape[-1]
    device = q.device
    scratch_pool = torch.empty((1, H, K, V), dtype=state_dtype, device=device)
    if T > 0:
        N = max(1, min(max_num_seqs, T))
        cu_seqlens = torch.div(torch.arange(N + 1, device=device) * T, N, rounding_mode="floor").to(torch.int32)
        slots = torch.full((N,), -1, dtype=slot_dtype, device=device)
        if aligned:
            fresh = torch.ones(N, dtype=torch.int8, device=device)
            starts = torch.zeros(N, dtype=torch.int64, device=device)
            window_k = torch.empty((1, H, WINDOW, K), dtype=torch.float32, device=device)
            window_v = torch.empty((1, H, WINDOW, V), dtype=torch.float32, device=device)
            windows = (scratch_pool, window_k, window_v)
            linear_attention_windowed(q, k, v, decay_rate, scale, cu_seqlens, starts, *windows, slots, fresh, out=out)
            linear_attention_windowed_decode(  # the decode's one-token variant
                q[:1], k[:1], v[:1], decay_rate, scale, starts[:1], *windows, slots[:1], fresh[:1]
            )
        else:
            linear_attention_prefill(q, k, v, decay_rate, scale, cu_seqlens, scratch_pool, slots, out=out)
        if not aligned and prefill.ONE_LAUNCH_MAX_TOKENS > 0:  # the one-launch variant of short steps too
            one = cu_seqlens[:2].clamp(max=1)
            plan = plan_prefill(one, 1, H, V, max_seqlen=1)
            linear_attention_prefill(q[:1], k[:1], v[:1], decay_rate, scale, one, scratch_pool, slots[:1], plan=plan)
    if aligned:  # its decode was compiled above; the default decode never runs
        return
    key = (q.dtype, v.dtype, state_dtype, slot_dtype, H, K, V, device)
    if key in _warmed:
        return
    for batch in (1, -(-wide_tile_min_rows(q.device) // H)):  # narrow and wide V-tiles
        rows = torch.zeros((batch, 3, H, max(K, V)), dtype=q.dtype, device=device)
        slots = torch.full((batch,), -1, dtype=slot_dtype, device=device)
        decode_v = rows[:, 2, :, :V].to(v.dtype)
        for fresh in (torch.zeros(batch, dtype=torch.int8, device=device), None):
            linear_attention_decode(
                rows[:, 0, :, :K], rows[:, 1, :, :K], decode_v, decay_rate, scale, scratch_pool, slots, fresh=fresh
            )
    _warmed.add(key)


def warm_up_expert_tiers(max_tokens: int) -> None:
    """Aligned mode's expert GEMMs take their tiles by the step's size (`ops.moe.aligned.TILE_SCHEDULE`): from now
    on, each MoE or dense layer shape's first launch also compiles every tier a step of up to `max_tokens` tokens
    can take (engines call this at start-up with their largest step; their first forward is the profiling one)."""
    if not (isinstance(max_tokens, int) and max_tokens > 0):
        raise ValueError(f"warm_up_expert_tiers: max_tokens must be a positive int, got {max_tokens!r}")
    moe_aligned.compile_tiers_ahead(max_tokens)
