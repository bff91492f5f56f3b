"""Linear attention with a fixed per-head decay ("simple GLA" / Lightning Attention), in plain PyTorch.

Per head, with state `S` of shape `[d_k, d_v]` and decay `lam = exp(-rate)`:

    S_t = lam * S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t                  (the current token counts with weight 1)

Two equivalent forms: `linear_attention_recurrent` (the per-token loop, the oracle) and
`linear_attention_chunked` (block-parallel, what training uses on CPU). The chunked form only ever
raises `lam` to non-negative powers, so no inverse-decay factor can overflow. Both run in fp32
(float64 for float64 input) whatever the input dtype, and return fp32 (float64) outputs and states.

Packed sequences (`*_varlen`) follow the FlashAttention convention: `[T, H, d]` tokens with
`cu_seqlens` `[N+1]` offsets; each sequence starts from its own initial state (zero when none is
given) and returns its own final state `[N, H, d_k, d_v]`. A zero-length sequence returns its initial
state unchanged.
"""

from __future__ import annotations

import torch

from ...precision import STATE_DTYPE, compute_dtype
from ..packing import equal_length_groups, is_partition


def _prepare(q, k, v, decay_rate, initial_state):
    dtype = compute_dtype(STATE_DTYPE, q.dtype)
    H, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    if initial_state is None:
        state = q.new_zeros((H, dk, dv), dtype=dtype)
    else:
        if initial_state.shape != (H, dk, dv):
            raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected {(H, dk, dv)}")
        state = initial_state.to(dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype), decay_rate.to(device=q.device, dtype=dtype), state


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, one token at a time.

    Args:
        q, k: `[T, H, d_k]`; v: `[T, H, d_v]`.
        decay_rate: `[H]`, the per-token decay is `exp(-decay_rate)`.
        scale: multiplies q (`d_k ** -0.5` for this model).
        initial_state: `[H, d_k, d_v]` or None (zeros).

    Returns:
        o `[T, H, d_v]` and the final state `[H, d_k, d_v]`, both fp32 (float64 for float64 input).
    """
    q, k, v, rate, state = _prepare(q, k, v, decay_rate, initial_state)
    lam = torch.exp(-rate)[:, None, None]
    outputs = []
    for t in range(q.shape[0]):
        state = lam * state + k[t, :, :, None] * v[t, :, None, :]
        outputs.append(scale * torch.einsum("hk,hkv->hv", q[t], state))
    o = torch.stack(outputs) if outputs else q.new_zeros((0, *v.shape[1:]))
    return o, state


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `linear_attention_recurrent`, block by block, for one sequence or a batch.

    Inside a block of length `c` starting from state `S0`, with local indices `i, j`:

        o_i   = scale * ( lam^(i+1) q_i S0 + sum_{j<=i} lam^(i-j) (q_i . k_j) v_j )
        S_end = lam^c S0 + sum_j lam^(c-1-j) k_j^T v_j

    Args:
        q, k: `[T, H, d_k]`, or `[B, T, H, d_k]` for B sequences of equal length; v likewise with d_v.
        initial_state: `[H, d_k, d_v]` (`[B, H, d_k, d_v]` when batched) or None (zeros).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if q.dim() == 3:
        o, state = linear_attention_chunked(
            q[None],
            k[None],
            v[None],
            decay_rate,
            scale,
            None if initial_state is None else initial_state[None],
            chunk_size,
        )
        return o[0], state[0]
    dtype = compute_dtype(STATE_DTYPE, q.dtype)
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    if initial_state is None:
        state = q.new_zeros((B, H, dk, dv), dtype=dtype)
    elif initial_state.shape != (B, H, dk, dv):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected {(B, H, dk, dv)}")
    else:
        state = initial_state.to(dtype)
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, d]
    rate = decay_rate.to(device=q.device, dtype=dtype)[:, None]  # [H, 1]
    outputs = []
    for start in range(0, T, chunk_size):
        c = min(chunk_size, T - start)
        qc, kc, vc = (x[:, :, start : start + c] for x in (q, k, v))  # [B, H, c, d]
        idx = torch.arange(c, device=q.device, dtype=dtype)
        q_decay = torch.exp(-rate * (idx + 1))[..., None]  # [H, c, 1]
        k_decay = torch.exp(-rate * (c - 1 - idx))[..., None]
        diff = idx[:, None] - idx[None, :]
        intra = torch.exp(-rate[..., None] * diff.clamp(min=0)) * (diff >= 0)  # [H, c, c]
        o = scale * ((qc * q_decay) @ state + ((qc @ kc.transpose(-1, -2)) * intra) @ vc)
        state = torch.exp(-rate * c)[..., None] * state + (kc * k_decay).transpose(-1, -2) @ vc
        outputs.append(o)
    o = torch.cat(outputs, dim=2) if outputs else q.new_zeros((B, H, 0, dv))
    return o.transpose(1, 2), state


def linear_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rate: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor,
    initial_states: torch.Tensor | None = None,
    chunked: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences, each with its own initial and final state.

    Args:
        q, k: `[T, H, d_k]`; v: `[T, H, d_v]` with `T = cu_seqlens[-1]`.
        cu_seqlens: `[N+1]` int offsets, non-decreasing, starting at 0.
        initial_states: `[N, H, d_k, d_v]` or None (all zeros).
        chunked: use the chunked form (True) or the per-token loop (False).

    Returns:
        o `[T, H, d_v]` and final states `[N, H, d_k, d_v]`, fp32 (float64 for float64 input).
    """
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if not is_partition(offsets, q.shape[0]):
        raise ValueError(f"cu_seqlens {offsets} does not partition {q.shape[0]} tokens")
    N = len(offsets) - 1
    if initial_states is not None and initial_states.shape[0] != N:
        raise ValueError(f"initial_states holds {initial_states.shape[0]} states for {N} sequences")
    dtype = compute_dtype(STATE_DTYPE, q.dtype)
    H, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    outputs: list[torch.Tensor | None] = [None] * N
    finals: list[torch.Tensor | None] = [None] * N
    for length, members, rows in equal_length_groups(offsets, q.device):
        init = None if initial_states is None else initial_states[members]
        if chunked:  # sequences of equal length run as one batch
            shape = (len(members), length)
            o, s = linear_attention_chunked(
                *(x[rows].reshape(*shape, *x.shape[1:]) for x in (q, k, v)), decay_rate, scale, init, chunk_size
            )
        else:
            pairs = [
                linear_attention_recurrent(
                    *(x[offsets[n] : offsets[n] + length] for x in (q, k, v)),
                    decay_rate,
                    scale,
                    None if init is None else init[i],
                )
                for i, n in enumerate(members)
            ]
            o, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        for i, n in enumerate(members):
            outputs[n], finals[n] = o[i], s[i]
    o = torch.cat(outputs) if N else q.new_zeros((0, H, dv), dtype=dtype)
    states = torch.stack(finals) if N else q.new_zeros((0, H, dk, dv), dtype=dtype)
    return o, states
