"""Aligned mode on a GPU (vLLM 0.26): with `RING_LINEAR_ALIGNED=1` (which brings `VLLM_BATCH_INVARIANT=1`) a
request's prompt and sampled-token logprobs are bit for bit the same alone and inside a batch of 64 mixed-length
requests; the default mode is held to no such thing. Chunked prefill is off (aligned mode's requirement without
prefix caching), CUDA graphs on.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from vllm_runs import free, generate, make_llm  # noqa: E402

from benchmarks.probe_aligned import mixed_prompts, served, where_they_differ  # noqa: E402

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_request_gets_the_same_bits_alone_and_in_a_batch_of_64(tiny_trained, monkeypatch, dtype):
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    prompts = mixed_prompts()
    llm = make_llm(
        tiny_trained, dtype=dtype, enable_chunked_prefill=False, max_num_batched_tokens=512, enforce_eager=False
    )
    try:
        batch = served(generate(llm, prompts, 16, logprobs=0, prompt_logprobs=0))
        alone = [served(generate(llm, [p], 16, logprobs=0, prompt_logprobs=0))[0] for p in prompts[::7]]
    finally:
        free(llm)
    differences = [where_they_differ(a, b) for a, b in zip(alone, batch[::7], strict=True)]
    unequal = sum(d is not None for d in differences)
    print(f"\n[{dtype}] aligned mode: {unequal} of {len(alone)} requests differ alone vs in the batch (bitwise)")
    for index, where in zip(range(0, len(prompts), 7), differences, strict=True):
        if where is not None:
            print(f"  request {index} ({len(prompts[index])} prompt tokens): {where}")
    shim_unequal = gap_to_the_shim(tiny_trained, dtype, prompts, batch)
    assert unequal == 0
    assert shim_unequal == 0, f"{shim_unequal} token logprobs of the aligned shim differ from the engine's"


def gap_to_the_shim(checkpoint, dtype: str, prompts, outputs) -> int:
    """Issue 15's claim: the shim's `token_logprobs(aligned=True)` on each prompt + its generated tokens against the
    engine's logprobs of the same tokens (printed), and how many differ in any bit."""
    import torch

    from common_kernels import RingLinearForCausalLM

    shim = RingLinearForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), device="cuda").eval()
    sequences = [prompt + tokens for prompt, (tokens, _, _) in zip(prompts, outputs, strict=True)]
    offsets = [0, *torch.tensor([len(s) for s in sequences]).cumsum(0).tolist()]
    ids = torch.tensor([t for s in sequences for t in s], device="cuda")
    with torch.no_grad():
        logprobs = shim.token_logprobs(
            ids, cu_seqlens=offsets, aligned=True, prompt_lengths=[len(p) for p in prompts]
        ).cpu()
    engine = torch.tensor([x for (_, sampled, prompt_lp) in outputs for x in [0.0, *prompt_lp, *sampled]])
    mine = torch.cat([logprobs[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
    gap = (mine.double() - engine.double()).abs()
    print(
        f"[{dtype}] aligned shim vs engine over {gap.numel()} tokens: unequal {(gap > 0).sum().item()}, "
        f"mean {gap.mean():.2e}, p99 {gap.quantile(0.99):.2e}, max {gap.max():.2e}"
    )
    return int((gap > 0).sum())
