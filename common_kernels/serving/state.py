"""What an engine must know to size and fill the linear-attention state pool of one tensor-parallel rank."""

from __future__ import annotations

import torch

from ..config import RingLinearConfig
from ..ops.linear_attn.windowed import WINDOW
from ..precision import STATE_DTYPE
from ..slopes import decay_rates

# the state dtypes an engine may ask for; "auto" (or nothing) is fp32, not the model dtype: a bf16 state is
# rounded at every decode step and drifts by several percent over 4K tokens
STATE_DTYPES = {None: STATE_DTYPE, "auto": STATE_DTYPE, "float32": torch.float32, "bfloat16": torch.bfloat16}


def linear_state_shape(config: RingLinearConfig, tp_size: int) -> tuple[int, int, int]:
    """One request's state in one linear layer on one rank: `[H / tp, d_k, d_v]` (no conv state)."""
    H, d_k, d_v = config.linear_state_shape
    return (H // tp_size, d_k, d_v)


def window_buffer_shapes(config: RingLinearConfig, tp_size: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Aligned mode's window buffer of one request in one linear layer on one rank, fp32: the keys `[H / tp, WINDOW,
    d_k]` and values `[H / tp, WINDOW, d_v]` of the tokens since the state's last grid point (`ops.linear_attn.
    windowed`)."""
    H, d_k, d_v = linear_state_shape(config, tp_size)
    return (H, WINDOW, d_k), (H, WINDOW, d_v)


def linear_state_dtype(requested: str | torch.dtype | None, setting: str = "the state dtype") -> torch.dtype:
    """The pool dtype for an engine's setting (`setting` names it in the error, e.g. `--mamba-cache-dtype`)."""
    if isinstance(requested, torch.dtype):
        requested = str(requested).removeprefix("torch.")
    if requested not in STATE_DTYPES:
        choices = ", ".join(str(name) for name in STATE_DTYPES if name is not None)
        raise ValueError(
            f"ring-linear: {setting} {requested!r} is not supported for the linear-attention state; use one of "
            f"{choices} (auto = float32; the kernels keep the state in fp32 or, on request, bf16)"
        )
    return STATE_DTYPES[requested]


def rank_decay_rates(
    config: RingLinearConfig, layer_idx: int, tp_size: int, tp_rank: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The fp32 decay rates `[H / tp]` of the heads that rank `tp_rank` holds (heads are split in order)."""
    per_rank = config.num_attention_heads // tp_size
    rates = decay_rates(config, layer_idx, dtype=torch.float32, device=device)
    return rates[tp_rank * per_rank : (tp_rank + 1) * per_rank].contiguous()
