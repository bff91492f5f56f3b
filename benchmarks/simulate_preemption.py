"""How often vLLM preempts on a given pool, without a GPU: vLLM's own scheduler and KV-cache manager driven with
fake model outputs (one token per finished prefill or decode), for the checkpoint's cache layout (its softmax
layers' KV, its linear layers' state, fp32). This is how the forced-preemption GPU test picks
`num_gpu_blocks_override`: vLLM admits a request only when its whole prompt fits, so a pool that holds one
request at a time never preempts.

python -m benchmarks.simulate_preemption runs/tiny/trained --blocks 40 150 --max-tokens 96   (vLLM 0.26, CPU)
"""

from __future__ import annotations

import argparse
import random


def simulate(checkpoint: str, blocks: int, lengths: list[int], max_tokens: int, budget: int) -> tuple[int, int, int]:
    """(engine steps, preemptions, most requests running at once) for `lengths` prompts on `blocks` blocks."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec
    from vllm.v1.request import Request

    from benchmarks.scheduler_stand_in import build_scheduler, stand_in_output
    from common_kernels.serving import linear_state_shape

    config = EngineArgs(
        model=checkpoint,
        dtype="float32",
        max_model_len=512,
        max_num_seqs=64,
        num_gpu_blocks_override=blocks,
        max_num_batched_tokens=budget,
        skip_tokenizer_init=True,
        enforce_eager=True,
    ).create_engine_config()
    config.scheduler_config.disable_hybrid_kv_cache_manager = False  # as on the GPU
    cache, model = config.cache_config, config.model_config.hf_config
    attention = FullAttentionSpec(
        block_size=cache.block_size,
        num_kv_heads=model.num_key_value_heads,
        head_size=model.head_dim,
        dtype=torch.float32,
    )
    state = MambaSpec(
        block_size=cache.mamba_block_size or 512,
        shapes=(linear_state_shape(model, 1),),
        dtypes=(torch.float32,),
        mamba_cache_mode=cache.mamba_cache_mode,
    )
    layers = range(model.num_hidden_layers)
    specs = {f"layer{i}": attention if model.is_softmax_layer(i) else state for i in layers}
    scheduler, _, _ = build_scheduler(config, specs, 10**10)
    preempted = []
    preempt = scheduler._preempt_request
    scheduler._preempt_request = lambda request, when: (preempted.append(request.request_id), preempt(request, when))
    rng = random.Random(11)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for index, length in enumerate(lengths):
        prompt = [rng.randrange(3, 64) for _ in range(length)]
        scheduler.add_request(Request(str(index), prompt, params, None, None))
    steps = most_running = 0
    while scheduler.has_requests():
        step = scheduler.schedule()
        steps += 1
        most_running = max(most_running, len(scheduler.running))
        scheduler.update_from_output(step, stand_in_output(scheduler, step, token=5))
    return steps, len(preempted), most_running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--blocks", type=int, nargs="+", required=True)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--budget", type=int, default=256, help="max_num_batched_tokens")
    args = parser.parse_args()
    from ring_linear_vllm.testing import install_cpu_platform  # vLLM's CUDA wheel on a CPU

    install_cpu_platform()
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    lengths = [random.Random(11).randint(50, 400) for _ in range(64)]  # the GPU test's prompts
    for blocks in args.blocks:
        steps, preemptions, running = simulate(args.checkpoint, blocks, lengths, args.max_tokens, args.budget)
        print(f"{blocks} blocks: {steps} steps, {preemptions} preemptions, at most {running} requests running")


if __name__ == "__main__":
    main()
