"""The environment switches the engine adapters read, parsed one way: 1/true/yes/on is on, 0/false/no/off is off,
unset is the switch's default, anything else is refused naming the variable (a typo must not silently mean off)."""

from __future__ import annotations

import os

# Aligned mode (`common_kernels.ops.linear_attn.aligned`): the engine computes each request the way the shim's
# `token_logprobs(..., aligned=True)` does, whatever the batch and however its prefill was split.
ALIGNED_MODE_SWITCH = "RING_LINEAR_ALIGNED"
# vLLM only: consecutive linear layers keep their states in one KV-cache entry, so vLLM runs its per-group host work
# for fewer groups; 1 stacks, 0 does not, unset lets `ring_linear_vllm.engine_config.stack_for` choose.
STACKED_STATES_SWITCH = "RING_LINEAR_STACKED_STATES"


def env_flag(name: str, default: bool | None = False) -> bool | None:
    """Whether the switch `name` is on in this process's environment (`default` when it is unset or empty)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"ring-linear: {name}={value!r} is not understood: set it to 1 or 0")


def aligned_mode() -> bool:
    """`RING_LINEAR_ALIGNED`: the engine's linear attention runs aligned (batch- and split-invariant)."""
    return env_flag(ALIGNED_MODE_SWITCH)


def stacked_states() -> bool | None:
    """`RING_LINEAR_STACKED_STATES`: vLLM keeps several linear layers' states in one cache entry (True), one each
    (False), or unset (None): the engine chooses."""
    return env_flag(STACKED_STATES_SWITCH, default=None)


def aligned_products_note() -> str:
    """What an aligned server says once at start-up: its bits follow `RING_LINEAR_FP32_DOT` (the fp32 products of
    the window form and the softmax attention), and a trainer scoring under another setting gets close logprobs,
    not these bits, with nothing else to tell it so."""
    from common_kernels.ops import triton_settings

    return (
        f"ring-linear: aligned mode multiplies fp32 operands as {triton_settings.FP32_DOT_PRECISION} "
        "(RING_LINEAR_FP32_DOT); a trainer's token_logprobs(aligned=True) gives these logprobs bit for bit only "
        "under the same setting"
    )
