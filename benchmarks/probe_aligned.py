"""Where aligned mode stops being batch-invariant (issue 15): the same requests in one batch of 64 and alone, and
for each request that differs, the first prompt position and the first generated step whose logprob changed.
A request differing first in its prompt points at the prefill path (projections, MoE, softmax or linear
attention over many sequences); one whose prompt is equal but whose decode differs points at the decode path
(CUDA-graph padding, split-KV attention). `--eager` takes torch.compile and CUDA graphs out of the comparison.

RING_LINEAR_ALIGNED=1 VLLM_BATCH_INVARIANT=1 python -m benchmarks.probe_aligned runs/tiny/trained --eager
"""

from __future__ import annotations

import argparse
import os
import random


def packed(sequences: list[list[int]], device: str = "cuda"):
    """Token sequences (each prompt + what the engine generated) as the shim takes them: `[T]` ids on `device` and
    host offsets `[N+1]`."""
    import torch

    offsets = [0, *torch.tensor([len(s) for s in sequences], dtype=torch.long).cumsum(0).tolist()]
    return torch.tensor([t for s in sequences for t in s], device=device), offsets


def first_difference(a: list, b: list) -> int | None:
    """The first index where two lists of logprobs (or token ids) differ bitwise, or None."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def served(outputs) -> list[tuple[list[int], list[float], list[float]]]:
    """Each request's generated ids, their logprobs and its prompt logprobs (after the first token)."""
    return [
        (
            list(o.outputs[0].token_ids),
            [next(iter(d.values())).logprob for d in o.outputs[0].logprobs],
            [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]],
        )
        for o in outputs
    ]


def where_they_differ(alone, together) -> str | None:
    """For one request's (tokens, logprobs, prompt logprobs) alone and in the batch: None if the same bits, else
    where they first differ."""
    tokens, sampled, prompt = together
    prompt_at = first_difference(alone[2], prompt)
    sampled_at = first_difference(alone[1], sampled) if alone[0] == tokens else first_difference(alone[0], tokens)
    if prompt_at is None and sampled_at is None:
        return None
    moved = "" if alone[0] == tokens else " (tokens differ)"
    return f"first prompt difference at {prompt_at}, first generated difference at {sampled_at}{moved}"


def mixed_prompts() -> list[list[int]]:
    """64 prompts of the tiny vocabulary: 1, 2, 63, 64, 65 and 300 tokens (around the 64-token segment grid), then
    58 random lengths up to 300."""
    rng = random.Random(31)
    lengths = [1, 2, 63, 64, 65, 300] + [rng.randint(1, 300) for _ in range(58)]
    return [[rng.randrange(3, 64) for _ in range(n)] for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--eager", action="store_true", help="no torch.compile, no CUDA graphs")
    parser.add_argument("--every", type=int, default=7, help="run every N-th request alone")
    args = parser.parse_args()
    if os.environ.get("RING_LINEAR_ALIGNED") != "1":
        raise SystemExit("probe_aligned: set RING_LINEAR_ALIGNED=1 (and VLLM_BATCH_INVARIANT=1)")
    from vllm import LLM, SamplingParams, TokensPrompt

    prompts = mixed_prompts()
    llm = LLM(
        model=args.checkpoint,
        dtype=args.dtype,
        max_model_len=512,
        max_num_seqs=64,
        gpu_memory_utilization=0.25,
        seed=0,
        skip_tokenizer_init=True,
        enforce_eager=args.eager,
        max_num_batched_tokens=128,  # chunked prefill splits the longer prompts
    )
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0, prompt_logprobs=0)

    def run(batch: list[list[int]]):
        return served(llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False))

    together = run(prompts)
    print(f"{args.dtype}, {'eager' if args.eager else 'compiled + CUDA graphs'}:")
    unequal = 0
    for index in range(0, len(prompts), args.every):
        where = where_they_differ(run([prompts[index]])[0], together[index])
        if where is not None:
            unequal += 1
            print(f"  request {index} ({len(prompts[index])} prompt tokens): {where}")
    print(f"  {unequal} of {len(range(0, len(prompts), args.every))} requests differ alone vs in the batch")


if __name__ == "__main__":
    main()
