"""Roll out with vLLM, then recompute the same token logprobs with the training shim (what an RL trainer does).

    pip install "ring-linear[vllm]"
    RING_LINEAR_PREFIX_CACHING=1 python examples/vllm_rollout_logprobs.py runs/tiny/trained   # or Ring-mini-linear-2.0

Each prompt is sampled n = 8 times (`SamplingParams(n=8)`), as GRPO-style trainers do, and every completion's
sampled-token logprobs are compared with the shim's `token_logprobs` over prompt + completion: both run the same
linear-attention kernels with an fp32 state and an fp32 LM head, so they agree to rounding. The 8 samples of a
prompt share it: with vLLM's prefix caching on (the plugin's opt-in `RING_LINEAR_PREFIX_CACHING=1` until its GPU
tests pass) the script prints how many prompt tokens came from the cache. The same calls are exercised by
tests/ring_linear_vllm/test_engine_gpu.py.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams, TokensPrompt

from common_kernels import RingLinearForCausalLM

SAMPLES_PER_PROMPT = 8


def main(model_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(text).input_ids for text in ("q4 c7 x0 m2|c:", "a1 b2 c3|b:")]
    llm = LLM(
        model=model_dir, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3, enable_prefix_caching=True
    )
    params = SamplingParams(n=SAMPLES_PER_PROMPT, temperature=1.0, max_tokens=8, logprobs=0, seed=0)
    rollouts = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)

    trainer_model = RingLinearForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
    worst = 0.0
    for prompt, rollout in zip(prompts, rollouts, strict=True):
        for completion in rollout.outputs:
            sampled = zip(completion.token_ids, completion.logprobs, strict=True)
            engine = torch.tensor([logprobs[token].logprob for token, logprobs in sampled])
            ids = torch.tensor(prompt + list(completion.token_ids), device="cuda")
            with torch.no_grad():
                trainer = trainer_model.token_logprobs(ids)[len(prompt) :].cpu()
            worst = max(worst, (engine - trainer).abs().max().item())
        texts = [tokenizer.decode(c.token_ids) for c in rollout.outputs]
        cached = rollout.num_cached_tokens or 0
        print(f"{tokenizer.decode(prompt)!r} -> {texts}; prompt tokens from the cache: {cached}")
    counters = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache_")}
    hits, queries = counters.get("vllm:prefix_cache_hits", 0), counters.get("vllm:prefix_cache_queries", 0)
    print(f"prefix cache: {hits:.0f} of {queries:.0f} prompt tokens hit")
    print(f"max |engine - trainer| logprob over {len(prompts) * SAMPLES_PER_PROMPT} completions: {worst:.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny/trained")
