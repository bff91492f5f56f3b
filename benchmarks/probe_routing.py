"""How many experts a served step's MoE layers read, against what a trained model's routing would read (issue 11's
benchmark validity).

A decode step whose top-8 choices spread over Ring-mini's 256 experts as a trained model's do reads most of every MoE
layer's experts, the same for ring-linear and its twin; served decode steps on the benchmark's dummy weights have
run faster than those reads allow (RESULTS.md, after run AJ). If the dummy weights route to fewer experts, a decode
step's MoE share is understated and every ratio whose attention differs is flattered. This probe counts, in one
in-process engine on the benchmark's dummy weights (spread routing when `gpu_checks.sh` runs it), the distinct
experts of every MoE call by its token count, beside uniform routing's expectation.

    python -m benchmarks.probe_routing --variant ring-linear [--requests 64 --context 4096 --tokens 32]

Eager (`enforce_eager`): routing does not depend on CUDA graphs, and a graph replay would not call the census. Calls
of 8 tokens or fewer skip vLLM's expert alignment (its naive block assignment, tokens x top-k x 4 <= experts) and go
uncounted; every larger one is counted.
Sampling at temperature 1, as `vllm bench serve` requests it (the server's default).
"""

from __future__ import annotations

import argparse
import os
import random
from collections import defaultdict

import torch


def uniform_distinct(experts: int, picks: int) -> float:
    """Expected distinct experts when `picks` choices fall uniformly on `experts` (top-k of distinct experts per
    token makes it slightly higher; within 1% at Ring-mini's sizes)."""
    return experts * (1.0 - (1.0 - 1.0 / experts) ** picks)


class RoutingCensus:
    """Distinct experts per MoE call, by the call's token count."""

    def __init__(self) -> None:
        self.by_tokens: dict[int, list[int]] = defaultdict(list)

    def record(self, topk_ids: torch.Tensor) -> None:
        self.by_tokens[topk_ids.shape[0]].append(int(torch.unique(topk_ids).numel()))

    def rows(self, experts: int, top_k: int) -> list[tuple[int, int, float, float]]:
        """(tokens, calls, mean distinct experts, uniform routing's expectation) per token count."""
        return [
            (tokens, len(counts), sum(counts) / len(counts), uniform_distinct(experts, tokens * top_k))
            for tokens, counts in sorted(self.by_tokens.items())
        ]


def install(census: RoutingCensus) -> None:
    """Count the experts of every call of vLLM's expert alignment (every Triton fused-MoE path of more than 8 tokens
    goes through it)."""
    from vllm import _custom_ops as ops

    align = ops.moe_align_block_size

    def counted(topk_ids, *args, **kwargs):
        census.record(topk_ids)
        return align(topk_ids, *args, **kwargs)

    ops.moe_align_block_size = counted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("ring-linear", "softmax-twin"), default="ring-linear")
    parser.add_argument("--requests", type=int, default=64, help="requests decoding together")
    parser.add_argument("--context", type=int, default=4096, help="their prompt length")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each generates")
    args = parser.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model runs in this process: the census sees its calls
    from vllm import SamplingParams

    from benchmarks.bench_vllm_e2e import dummy_llm, random_prompts

    census = RoutingCensus()
    install(census)
    llm = dummy_llm(
        args.variant, max_model_len=args.context + args.tokens + 16, max_num_seqs=args.requests,
        enable_prefix_caching=False, enforce_eager=True, gpu_memory_utilization=0.8,
    )  # fmt: skip
    config = llm.llm_engine.model_config.hf_config
    experts, top_k = config.num_experts, config.num_experts_per_tok
    prompts = random_prompts(random.Random(0), args.requests, args.context)
    llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=0))
    print(f"{args.variant}: {args.requests} requests of {args.context} tokens, {args.tokens} generated each\n")
    print(
        "| tokens in the call | calls | distinct experts, mean | uniform routing | ratio |\n|---:|---:|---:|---:|---:|"
    )
    for tokens, calls, mean, uniform in census.rows(experts, top_k):
        print(f"| {tokens} | {calls} | {mean:.1f} | {uniform:.1f} | {mean / uniform:.2f} |")


if __name__ == "__main__":
    main()
