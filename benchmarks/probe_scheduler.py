"""vLLM's scheduler alone, on the CPU: host time per engine step for Ring-mini's KV-cache layout against its softmax
twin's, pass after pass (issues 11 and 13).

On the GPU a served Ring-mini decode step spends more host time than the twin's (RESULTS.md run T: 3.4-3.9 against
1.9 ms a synchronous step), most of it in vLLM's KV-cache bookkeeping, which runs once per request per KV-cache group:
vLLM groups Ring-mini's 4 softmax and 16 linear layers into 1 + 4 groups, the twin's 20 softmax layers into one. And
a served second pass decodes slower than the first (runs K, M, P). The scheduler is plain Python that needs no GPU,
so this probe runs vLLM's own `Scheduler` on the real layers' KV-cache specs with a stand-in model runner (every
scheduled request that finishes its prompt samples one token) and times `schedule()` plus `update_from_output()` per
step, for each pass of the same prompts, the way `vllm bench serve` sends them: `--concurrency` requests in flight,
the next one admitted as one finishes.

    python -m benchmarks.probe_scheduler --layout ring-linear --prefix-caching
    python -m benchmarks.probe_scheduler --layout softmax-twin --prefix-caching
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.scheduler_stand_in import build_scheduler, stand_in_output
from common_kernels.presets import preset_json

# Ring-mini's per-rank shapes: 16 query heads, 4 KV heads of 128 in the softmax layers; a 16 x 128 x 128 fp32 state
# per linear layer. Which layers are which does not matter to the scheduler, only how many of each.
SOFTMAX_LAYERS = {"ring-linear": 4, "softmax-twin": 20}
LINEAR_LAYERS = {"ring-linear": 16, "softmax-twin": 0}
KV_HEADS, HEAD_DIM, LINEAR_HEADS = 4, 128, 16
GIB = 1 << 30
# the ring-linear layout runs on Ring-mini's own config (the plugin registered), so the plugin's scheduler changes
# act as they do when served (`ring_linear_vllm.prefix_replay`)
RING_MINI = "ring-mini-linear-2.0"


def scheduler_for(
    layout: str,
    prefix_caching: bool,
    max_model_len: int,
    max_num_seqs: int,
    kv_memory_gib: float,
    prefix_match_unit: int | None = None,
    stack: int = 1,
):
    """vLLM's scheduler with the layout's KV-cache groups, built as the engine core builds it (`prefix_match_unit`:
    vLLM's `--prefix-match-unit`, hits finer than a block; `stack`: the linear layers' states stacked `stack` to a
    cache entry, as the plugin serves them where prefix caching loses least (`engine_config.stack_for`): 16 linear
    layers as 16 / stack entries of `stack` states, so vLLM makes fewer KV-cache groups of larger blocks)."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    hybrid = LINEAR_LAYERS[layout] > 0
    if stack != 1 and (not hybrid or LINEAR_LAYERS[layout] % stack):
        raise ValueError(f"--stack {stack} must divide {layout}'s {LINEAR_LAYERS[layout]} linear layers")
    # vLLM's choice for Ring-mini: softmax blocks of 512 tokens, one page = one layer's 1 MiB state; the twin: 16
    block_size = 512 * stack if hybrid else 16
    model_dir = Path(tempfile.mkdtemp(prefix="probe-scheduler-"))
    config = preset_json(RING_MINI, max_position_embeddings=max_model_len) if hybrid else twin_stand_in(max_model_len)
    (model_dir / "config.json").write_text(json.dumps(config))
    model_config = ModelConfig(model=str(model_dir), max_model_len=max_model_len, skip_tokenizer_init=True)
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching)
    if prefix_match_unit is not None:  # a field vLLM 0.26 has; left alone otherwise
        cache_config.prefix_match_unit = prefix_match_unit
    if hybrid:
        cache_config.mamba_cache_mode = "align" if prefix_caching else "none"
        cache_config.mamba_block_size = block_size if prefix_caching else max_model_len
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=8192, max_model_len=max_model_len,
        enable_chunked_prefill=True, is_encoder_decoder=False,
    )  # fmt: skip
    vllm_config = VllmConfig(model_config=model_config, cache_config=cache_config, scheduler_config=scheduler_config)
    specs = {
        f"model.layers.{i}.attention": FullAttentionSpec(
            block_size=block_size, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.bfloat16
        )
        for i in range(SOFTMAX_LAYERS[layout])
    }
    for i in range(LINEAR_LAYERS[layout] // stack):
        state = (LINEAR_HEADS, HEAD_DIM, HEAD_DIM) if stack == 1 else (stack, LINEAR_HEADS, HEAD_DIM, HEAD_DIM)
        specs[f"model.layers.{SOFTMAX_LAYERS[layout] + i}.linear_attention"] = MambaSpec(
            block_size=cache_config.mamba_block_size, shapes=(state,),
            dtypes=(torch.float32,), mamba_type=MambaAttentionBackendEnum.LINEAR,
            mamba_cache_mode=cache_config.mamba_cache_mode,
        )  # fmt: skip
    return build_scheduler(vllm_config, specs, int(kv_memory_gib * GIB))


def twin_stand_in(max_model_len: int) -> dict:
    """A tiny Llama's config for the twin's layout: the scheduler reads only the model's length limits from it."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 157184,
        "max_position_embeddings": max_model_len, "torch_dtype": "bfloat16",
    }  # fmt: skip


def block_hasher(hash_block_size: int | None):
    """What the engine core hands each request when prefix caching is on."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    if hash_block_size is None:
        return None
    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return get_request_block_hasher(hash_block_size, hash_fn)


def run_pass(scheduler, prompts: list[list[int]], output_len: int, concurrency: int, hasher, tag: str) -> dict:
    """Serve `prompts` with `concurrency` in flight; host seconds of each step's schedule + update."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    waiting = iter(enumerate(prompts))
    in_flight, finished, step_seconds, hit_tokens, batch_sizes = 0, 0, [], 0, []

    def admit() -> None:
        nonlocal in_flight
        for i, prompt in waiting:
            request = Request(f"{tag}-{i}", list(prompt), params, None, block_hasher=hasher)
            request.eos_token_id = None
            scheduler.add_request(request)
            in_flight += 1
            if in_flight >= concurrency:
                return

    admit()
    while finished < len(prompts):
        start = time.perf_counter()
        output = scheduler.schedule()
        hit_tokens += sum(r.num_computed_tokens for r in output.scheduled_new_reqs)
        batch_sizes.append(len(output.num_scheduled_tokens))
        outputs = scheduler.update_from_output(output, stand_in_output(scheduler, output, token=7))
        step_seconds.append(time.perf_counter() - start)
        done = sum(
            1 for engine_outputs in outputs.values() for o in engine_outputs.outputs if o.finish_reason is not None
        )
        finished += done
        in_flight -= done
        if done:
            admit()
    return {
        "steps": len(step_seconds),
        "median_ms": 1e3 * statistics.median(step_seconds),
        "mean_ms": 1e3 * statistics.fmean(step_seconds),
        "hit_tokens": hit_tokens,
        "mean_batch": statistics.fmean(batch_sizes),
        "prompt_tokens": sum(len(p) for p in prompts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=sorted(SOFTMAX_LAYERS), default="ring-linear")
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument("--prefix-match-unit", type=int, help="vLLM's --prefix-match-unit: hits finer than a block")
    parser.add_argument(
        "--stack",
        type=int,
        default=1,
        help="stack the linear layers' states this many to a cache entry (engine_config.stack_for)",
    )
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=4096)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--kv-memory-gib", type=float, default=90.0, help="KV cache memory (an H200 after weights)")
    args = parser.parse_args()

    import random

    import torch

    if not torch.cuda.is_available():  # the scheduler needs no GPU, only a platform for vLLM's config checks
        from ring_linear_vllm.testing import install_cpu_platform

        install_cpu_platform()
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # as every vLLM process does: our model type, and our scheduler changes
    max_model_len = args.input_len + args.output_len + 64
    scheduler, kv_cache_config, hash_block_size = scheduler_for(
        args.layout,
        args.prefix_caching,
        max_model_len,
        args.concurrency,
        args.kv_memory_gib,
        args.prefix_match_unit,
        args.stack,
    )
    hasher = block_hasher(hash_block_size if args.prefix_caching else None)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 150000) for _ in range(args.input_len)] for _ in range(args.prompts)]
    groups = [type(g.kv_cache_spec).__name__ for g in kv_cache_config.kv_cache_groups]
    print(
        f"{args.layout}{f', linear states stacked {args.stack} to an entry' if args.stack > 1 else ''}: "
        f"{len(groups)} KV-cache groups ({', '.join(groups)}), {kv_cache_config.num_blocks} blocks, "
        f"prefix caching {'on' if args.prefix_caching else 'off'} (hits every {hash_block_size} tokens); "
        f"{args.prompts} prompts of {args.input_len} + "
        f"{args.output_len} out, {args.concurrency} in flight\n"
    )
    print(
        "| pass | steps | requests per step, mean | host ms per step, median | mean | prompt tokens hit |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    for p in range(args.passes):
        r = run_pass(scheduler, prompts, args.output_len, args.concurrency, hasher, f"pass{p}")
        hit = f"{r['hit_tokens'] / r['prompt_tokens']:.1%}"
        print(f"| {p + 1} | {r['steps']} | {r['mean_batch']:.1f} | {r['median_ms']:.3f} | {r['mean_ms']:.3f} | {hit} |")


if __name__ == "__main__":
    main()
