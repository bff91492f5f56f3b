"""The launcher's check of SGLang's server arguments for our architectures: what cannot run is refused before
any worker starts, naming the valid choices (an SGLang per-architecture override provider)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from common_kernels.serving import (
    ALIGNED_MODE_SWITCH,
    aligned_mode,
    aligned_products_note,
    check_serving_settings,
    linear_state_dtype,
)

logger = logging.getLogger(__name__)

# `no_buffer` restores a cached prefix's state from its slot before the suffix runs; `extra_buffer` needs
# chunk-aligned state snapshots from the prefill kernel, which ours does not write yet
RADIX_STRATEGIES = ("auto", "no_buffer")


def check_server_args(server_args: Any, hf_config: Any) -> dict:
    """Raise ValueError for settings Ring-linear-2.0 cannot serve; returns no overrides (SGLang's contract)."""
    speculative = getattr(server_args, "speculative_algorithm", None)
    disaggregated = getattr(server_args, "disaggregation_mode", "null") not in (None, "null")
    check_serving_settings(
        hf_config,
        tp_size=getattr(server_args, "tp_size", 1),
        pp_size=getattr(server_args, "pp_size", 1),
        speculative_flag="--speculative-algorithm" if speculative else None,
        pipeline_parallel_supported=False,
        kv_transfer_flag="--disaggregation-mode" if disaggregated else None,
    )
    if getattr(server_args, "enable_dp_attention", False):
        raise ValueError(
            "ring-linear: --enable-dp-attention is not supported for Ring-linear-2.0 (the linear-attention state "
            "is split by tensor parallelism); drop it and use --tp-size"
        )
    strategy = getattr(server_args, "mamba_radix_cache_strategy", None) or "auto"
    if not getattr(server_args, "disable_radix_cache", False) and strategy not in RADIX_STRATEGIES:
        raise ValueError(
            f"ring-linear: --mamba-radix-cache-strategy {strategy} is not supported for Ring-linear-2.0; use one of "
            f"{', '.join(RADIX_STRATEGIES)}, or --disable-radix-cache"
        )
    linear_state_dtype(getattr(server_args, "mamba_ssm_dtype", None), "--mamba-ssm-dtype")
    if aligned_mode():
        check_aligned_settings(server_args)
    return {}


def check_aligned_settings(server_args: Any) -> None:
    """Aligned mode computes every layer as the trainer does: SGLang's batch-invariant log-softmax
    (`--enable-deterministic-inference`), the state and window buffer in fp32, each prompt in one step (vLLM serves
    aligned mode with chunked prefill and prefix caching; on SGLang neither has run on a GPU yet), no prefill CUDA
    graph (it would replay the aligned attention with its capture batch's metadata), all experts on one rank in
    unquantized weights in the Triton runner's layout, a KV cache in the model dtype, and no torch.compile."""
    chunk = getattr(server_args, "chunked_prefill_size", None)
    tp, ep = getattr(server_args, "tp_size", 1), getattr(server_args, "ep_size", 1)
    quantization = getattr(server_args, "quantization", None)
    moe_backend = getattr(server_args, "moe_runner_backend", None) or "auto"
    needed = [
        (not getattr(server_args, "enable_deterministic_inference", False), "add --enable-deterministic-inference"),
        (chunk is not None and chunk > 0, f"pass --chunked-prefill-size -1 (not {chunk})"),
        (not getattr(server_args, "disable_radix_cache", False), "add --disable-radix-cache"),
        (tp > 1, f"drop --tp-size {tp}"),
        (ep > 1, f"drop --ep-size {ep}"),
        (quantization is not None, f"drop --quantization {quantization}"),
        (getattr(server_args, "kv_cache_dtype", "auto") not in ("auto", None), "drop --kv-cache-dtype"),
        # the window form keeps the state and its window buffer (in SGLang's conv state) in fp32
        (
            linear_state_dtype(getattr(server_args, "mamba_ssm_dtype", None), "--mamba-ssm-dtype") != torch.float32,
            "drop --mamba-ssm-dtype (aligned mode keeps the state in float32)",
        ),
        (getattr(server_args, "enable_int8_mamba_checkpoint", False), "drop --enable-int8-mamba-checkpoint"),
        # inductor computes the bf16 glue between our kernels in other bits than the shim's eager forward (found on
        # vLLM, which aligned mode therefore traces without inductor; SGLang has no such middle setting)
        (getattr(server_args, "enable_torch_compile", False), "drop --enable-torch-compile"),
        # a prefill CUDA graph would capture the aligned attention with its capture batch's metadata
        (not getattr(server_args, "disable_prefill_cuda_graph", True), "add --disable-prefill-cuda-graph"),
        # the aligned MoE reads w13 as [gate; up], the Triton runner's layout (others store [up; gate] or transpose)
        (moe_backend not in ("auto", "triton"), f"use --moe-runner-backend triton (not {moe_backend})"),
    ]
    fixes = [fix for is_needed, fix in needed if is_needed]
    if fixes:
        raise ValueError(
            f"ring-linear: {ALIGNED_MODE_SWITCH}=1 (aligned mode) on SGLang needs: {'; '.join(fixes)} (or unset "
            f"{ALIGNED_MODE_SWITCH})"
        )
    logger.info(aligned_products_note())
