"""vLLM's scheduler driven without a GPU: built from per-layer cache specs the way vLLM 0.26's engine core builds it,
and fed a stand-in model runner's output (one token for each request whose scheduled tokens reach its end).
`probe_scheduler` times it; `simulate_preemption` counts its preemptions."""

from __future__ import annotations


def build_scheduler(vllm_config, specs: dict, memory_bytes: int):
    """(scheduler, its KV-cache config, the prefix-cache hash block size) for layers `specs` on `memory_bytes`."""
    from vllm.v1.core.kv_cache_utils import (
        generate_scheduler_kv_cache_config,
        get_kv_cache_configs,
        resolve_kv_cache_block_sizes,
    )
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    kv_cache_config = generate_scheduler_kv_cache_config(get_kv_cache_configs(vllm_config, [specs], [memory_bytes]))
    cache_config = vllm_config.cache_config
    cache_config.num_gpu_blocks = kv_cache_config.num_blocks
    cache_config.block_size = min(group.kv_cache_spec.block_size for group in kv_cache_config.kv_cache_groups)
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    scheduler = Scheduler(
        vllm_config, kv_cache_config, StructuredOutputManager(vllm_config),
        block_size=block_size, hash_block_size=hash_block_size,
    )  # fmt: skip
    return scheduler, kv_cache_config, hash_block_size


def stand_in_output(scheduler, step, token: int):
    """The model runner's output for scheduled `step`: `token` for every request that reaches its last token (a
    finished prefill or a decode), nothing for a prefill chunk that does not."""
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(step.num_scheduled_tokens)
    sampled = []
    for request_id in ids:
        request = scheduler.requests[request_id]
        caught_up = request.num_computed_tokens >= request.num_tokens  # schedule() already counted this step's tokens
        sampled.append([token] if caught_up else [])
    return ModelRunnerOutput(
        req_ids=ids, req_id_to_index={request_id: k for k, request_id in enumerate(ids)}, sampled_token_ids=sampled
    )
