"""Per-layer, per-head decay of the linear-attention layers.

The decay is fixed, not learned and not stored in the checkpoint: head `h` of layer `l` multiplies its
state by `lambda = exp(-s_h * f_l)` every token.

* `s_h` are the ALiBi / Lightning-Attention-2 slopes: `2^(-8(h+1)/H)` for a power-of-two `H`; otherwise
  the slopes of the nearest lower power of two followed by every other slope of the doubled power.
* `f_l` depends on the layer index, and two conventions exist (L = num_hidden_layers, l 0-based, counted
  over all layers, softmax ones included):

  - `"engine"`: `f_l = 1 - l/(L-1) + 1e-5`. The authors' own SGLang build, upstream vLLM and SGLang, and
    Megatron-style training code (`layer_number - 1` with 1-based numbers) use this. Default, because the
    paper aligned training to that rollout engine.
  - `"hf"`: `f_l = 1 - (l-1)/(L-1) + 1e-5`, as the HF remote code is quoted by several ports (no clamp:
    layer 0 gets `1 + 1/(L-1)`). Shifted by one layer; it doubles the slope of the deepest linear layer
    of Ring-mini (layer 18: factor 0.105 instead of 0.053).

For a single-layer model `L - 1 = 0`; the denominator is taken as 1 so both conventions stay finite.
"""

from __future__ import annotations

import math

import torch

from .config import DECAY_CONVENTIONS, RingLinearConfig


def alibi_slopes(num_heads: int) -> list[float]:
    """Base slopes `s_h`, h = 0..H-1, in Python floats."""

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if math.log2(num_heads).is_integer():
        return power_of_two_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two_slopes(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def layer_decay_factor(layer_idx: int, num_layers: int, convention: str = "engine") -> float:
    """`f_l` of the module docstring."""
    if convention not in DECAY_CONVENTIONS:
        raise ValueError(f"decay convention must be one of {DECAY_CONVENTIONS}, got {convention!r}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx={layer_idx} outside [0, {num_layers})")
    index = layer_idx if convention == "engine" else layer_idx - 1
    return 1.0 - index / max(num_layers - 1, 1) + 1e-5


def decay_rates(
    config: RingLinearConfig, layer_idx: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-head decay rate `s_h * f_l` of one layer, shape `[H]`; the per-token decay is `exp(-rate)`.

    Computed in float64 and then cast, so float32 and float64 runs start from the same numbers.
    """
    factor = layer_decay_factor(layer_idx, config.num_hidden_layers, config.linear_decay_convention)
    slopes = torch.tensor(alibi_slopes(config.num_attention_heads), dtype=torch.float64, device="cpu")
    return (slopes * factor).to(dtype=dtype, device=device)
