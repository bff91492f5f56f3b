"""Roll out with vLLM, then recompute the same token logprobs with the training shim (what an RL trainer does).

    pip install "ring-linear[vllm]"
    python examples/vllm_rollout_logprobs.py runs/tiny/trained      # or a Ring-mini-linear-2.0 directory

The rollout's sampled-token logprobs and the shim's `token_logprobs` over prompt + completion should agree
to rounding: both run the same linear-attention kernels with an fp32 state and an fp32 LM head. The same
calls are exercised by tests/ring_linear_vllm/test_engine_gpu.py.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams, TokensPrompt

from common_kernels import RingLinearForCausalLM


def main(model_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(text).input_ids for text in ("q4 c7 x0 m2|c:", "a1 b2 c3|b:")]
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=1.0, max_tokens=8, logprobs=0, seed=0)
    rollouts = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)

    trainer_model = RingLinearForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
    for prompt, rollout in zip(prompts, rollouts, strict=True):
        completion = rollout.outputs[0]
        sampled = zip(completion.token_ids, completion.logprobs, strict=True)
        engine = torch.tensor([logprobs[token].logprob for token, logprobs in sampled])
        ids = torch.tensor(prompt + list(completion.token_ids), device="cuda")
        with torch.no_grad():
            trainer = trainer_model.token_logprobs(ids)[len(prompt) :].cpu()
        print(
            f"{tokenizer.decode(prompt)!r} -> {tokenizer.decode(completion.token_ids)!r}: "
            f"max |engine - trainer| logprob = {(engine - trainer).abs().max():.2e}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny/trained")
