"""Roll out with vLLM, then recompute the same token logprobs with the training shim (what an RL trainer does).

    pip install "ring-linear[vllm]"
    python examples/vllm_rollout_logprobs.py runs/tiny/trained   # or Ring-mini-linear-2.0

Each prompt is sampled n = 8 times (`SamplingParams(n=8)`), as GRPO-style trainers do, and every completion's
sampled-token logprobs are compared with the shim's `token_logprobs` over prompt + completion: both run the same
linear-attention kernels with an fp32 state and an fp32 LM head, so they agree to rounding. With vLLM's prefix
caching on (the script asks for it; vLLM 0.26 leaves it off for hybrid models by default) the script prints how
many prompt tokens came from the cache in each of two rounds over the same prompts. The same calls are exercised by
tests/ring_linear_vllm/test_engine_gpu.py.
"""

from __future__ import annotations

import random
import sys

import torch
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams, TokensPrompt

from common_kernels import RingLinearForCausalLM
from common_kernels.tiny.task import make_sample

SAMPLES_PER_PROMPT = 8


def main(model_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)  # two recall prompts of 12 pairs: long enough to fill cache blocks
    prompts = [tokenizer(make_sample(rng, num_pairs=12, num_queries=2).prompt).input_ids for _ in range(2)]
    llm = LLM(
        model=model_dir, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3, enable_prefix_caching=True,
        disable_log_stats=False,  # the cache-hit counters
    )  # fmt: skip
    trainer_model = RingLinearForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
    # two rounds over the same prompts, as a trainer that rolls its batch out again: the 8 samples of a round start
    # in one step, where vLLM shares nothing between them, so hits come from the first round's cached blocks
    for round_index in range(2):
        params = SamplingParams(n=SAMPLES_PER_PROMPT, temperature=1.0, max_tokens=8, logprobs=0, seed=round_index)
        rollouts = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        worst, cached = 0.0, 0
        for prompt, rollout in zip(prompts, rollouts, strict=True):
            cached += rollout.num_cached_tokens or 0
            for completion in rollout.outputs:
                sampled = zip(completion.token_ids, completion.logprobs, strict=True)
                engine = torch.tensor([logprobs[token].logprob for token, logprobs in sampled])
                ids = torch.tensor(prompt + list(completion.token_ids), device="cuda")
                with torch.no_grad():
                    trainer = trainer_model.token_logprobs(ids)[len(prompt) :].cpu()
                worst = max(worst, (engine - trainer).abs().max().item())
        print(
            f"round {round_index}: {len(prompts) * SAMPLES_PER_PROMPT} completions, max |engine - trainer| logprob "
            f"{worst:.2e}; prompt tokens from the cache: {cached} of {sum(map(len, prompts))}"
        )
    counters = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache_")}
    hits, queries = counters.get("vllm:prefix_cache_hits", 0), counters.get("vllm:prefix_cache_queries", 0)
    print(f"prefix cache over both rounds: {hits:.0f} of {queries:.0f} looked-up prompt tokens hit")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny/trained")
