"""vLLM's own step kernels, compiled at start-up for our cache layout instead of on the first request.

vLLM 0.26 warms its KV-block zeroing kernel (`_zero_kv_blocks_kernel`) and its slot-mapping kernel
(`_compute_slot_mapping_kernel`) for Qwen's hybrid models only (`qwen_triton_warmup`, gated by model type), and
the latter at a fixed 16-token block. Ring-mini's softmax layers get 512-token blocks split into kernel blocks,
which are compile-time constants of the slot-mapping kernel, so both kernels compiled while the first requests
waited (vLLM's JIT monitor named them in every served run). `install()` wraps that hook so that, for our model
type, it also launches both kernels on the runner's own block tables and zeroer: the same compile keys as
serving, before any request. 0.33 warms the zeroer itself; the extra launches then hit its cache.

With prefix caching it compiles vLLM's state-copy kernel too (`warm_state_copy`). It also runs one eager dummy step
of the largest odd token count a step can take. vLLM's `fused_moe_kernel`
specialises its token counts on divisibility by 16, which for top-8 routing is the count's parity; the profiling
step (the token budget) and every CUDA-graph size are even, so the first odd mixed step above the largest graph
compiles it: the likely source of the live `fused_moe_kernel` compile vLLM's JIT monitor named on default mode's
first chat pass (run AA).
"""

from __future__ import annotations

from typing import Any

import torch

from common_kernels.config import RingLinearConfig

from .compat import wrap_once

# `_zero_kv_blocks_kernel` specialises its block count on == 1 and on divisibility by 16
ZEROED_BLOCK_COUNTS = (1, 2, 16)


def install() -> None:
    """Wrap vLLM's model-type warm-up hook (idempotent; a release without it is left alone)."""
    try:
        from vllm.model_executor.warmup import kernel_warmup
    except ImportError:
        return

    def make_wrapper(original: Any) -> Any:
        def qwen_triton_warmup(runner: Any, model_config: Any) -> None:
            original(runner, model_config)
            if getattr(getattr(model_config, "hf_config", None), "model_type", None) == RingLinearConfig.model_type:
                warm_step_kernels(runner)
                warm_state_copy(runner)
                warm_odd_step(runner)

        return qwen_triton_warmup

    wrap_once(kernel_warmup, "qwen_triton_warmup", make_wrapper)


@torch.inference_mode()
def warm_step_kernels(runner: Any) -> None:
    """Launch the slot-mapping kernel once per KV-cache group and the zeroing kernel at each specialised block
    count. Safe before serving: with no request scheduled the slot mapping only pads its own buffer, and the
    zeroed blocks hold nothing yet (vLLM's Qwen warm-up zeroes the same way)."""
    device = runner.device
    block_tables = runner.input_batch.block_table
    query_start_loc = torch.zeros(1, dtype=torch.int32, device=device)
    positions = torch.zeros(0, dtype=torch.int64, device=device)
    block_tables.compute_slot_mapping(0, query_start_loc, positions)
    zeroer = getattr(runner, "kv_block_zeroer", None) or getattr(runner, "_kv_block_zeroer", None)
    if zeroer is not None:
        for count in ZEROED_BLOCK_COUNTS:
            zeroer.zero_block_ids(list(range(min(count, runner.kv_cache_config.num_blocks))))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def warm_state_copy(runner: Any) -> None:
    """With prefix caching (align mode), vLLM copies linear states between blocks with its `batch_memcpy_kernel`
    (a block's end state, `--prefix-match-unit`'s partial tail), which no start-up step runs: its first copy compiled
    it during a served request (run AE's JIT monitor). One copy of zero bytes compiles the same variant (uint64
    pointers, int32 sizes, as `MambaCopyBuffers` holds them)."""
    cache_config = getattr(runner, "cache_config", None)
    if cache_config is None or not cache_config.enable_prefix_caching or cache_config.mamba_cache_mode != "align":
        return
    try:
        from vllm.v1.worker.mamba_utils import batch_memcpy
    except ImportError:  # a release without it copies otherwise
        return
    pointers = torch.zeros(1, dtype=torch.uint64, device=runner.device)
    batch_memcpy(pointers, pointers.clone(), torch.zeros(1, dtype=torch.int32, device=runner.device))


def odd_step_size(max_num_tokens: int, graph_sizes: list[int]) -> int | None:
    """The largest odd token count a step can take, where it runs outside the CUDA graphs (else None)."""
    odd = max_num_tokens if max_num_tokens % 2 else max_num_tokens - 1
    return odd if odd > max(graph_sizes, default=0) else None


def warm_odd_step(runner: Any) -> None:
    """One dummy step, as vLLM's own warm-up sizes run (`compile_or_warm_up_model`), before graph capture."""
    size = odd_step_size(runner.max_num_tokens, runner.cudagraph_batch_sizes)
    if size is not None:
        runner._dummy_run(size, skip_eplb=True, remove_lora=False)
