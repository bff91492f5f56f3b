"""Aligned mode on a GPU (vLLM 0.26): with `RING_LINEAR_ALIGNED=1` (which brings `VLLM_BATCH_INVARIANT=1`) a
request's prompt and sampled-token logprobs are bit for bit the same alone and inside a batch of 64 mixed-length
requests, resent through the prefix cache, and equal to the aligned shim's; chunked prefill (a small token budget,
so prompts split mid-way), prefix caching and CUDA graphs on.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from vllm_runs import free, generate, make_llm  # noqa: E402

from benchmarks.probe_aligned import mixed_prompts, packed, served, where_they_differ  # noqa: E402

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_request_gets_the_same_bits_alone_and_in_a_batch_of_64(tiny_trained, monkeypatch, dtype):
    check_aligned_serving(tiny_trained, dtype, monkeypatch)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eager(tiny_trained, monkeypatch, dtype):
    """The same with no torch.compile and no CUDA graphs (`enforce_eager`), which also tells a difference the
    compiler makes from one the kernels make."""
    check_aligned_serving(tiny_trained, dtype, monkeypatch, eager=True)


def test_ring_mini_shapes_one_layer_group_bf16(ring_mini_one_group, monkeypatch):
    """Ring-mini's shapes (16 heads of 128, 256 experts, top-8 of 8 groups, a 157K vocabulary) with random weights,
    cut to one layer group: a dense layer, three linear MoE layers and a softmax MoE layer."""
    check_aligned_serving(ring_mini_one_group, "bfloat16", monkeypatch, budget=1024, must_hit=False)


@pytest.mark.parametrize("eager, caching", [(True, True), (False, False)])
def test_ring_mini_shapes_eager_or_without_the_prefix_cache(ring_mini_one_group, monkeypatch, eager, caching):
    """The same without CUDA graphs, or without prefix caching (vLLM's mamba cache mode `none`, another slot map)."""
    check_aligned_serving(
        ring_mini_one_group, "bfloat16", monkeypatch, budget=1024, must_hit=False, eager=eager, caching=caching
    )


@pytest.fixture(scope="module")
def ring_mini_one_group(tmp_path_factory):
    """A random Ring-mini checkpoint of `layer_group_size` layers, written by the shim (bf16), so the shim and the
    engine read the same weights."""
    from benchmarks.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ring-mini-one-group"))


# the requests sent again alone and through the cache: every 7th, and the 300-token prompt, longer than any block
PICKED = sorted({*range(0, 64, 7), 5})


def check_aligned_serving(
    checkpoint,
    dtype: str,
    monkeypatch,
    budget: int = 288,
    must_hit: bool = True,
    eager: bool = False,
    caching: bool = True,
) -> None:
    """64 mixed-length requests in one engine (CUDA graphs, traced without inductor, chunked prefill over `budget`-token
    steps: vLLM's align mode needs one block at least, 144 or 288 tokens for the tiny model; prefix caching), every 7th
    (and the 300-token prompt) again alone, then again without
    prompt logprobs so that it reads the prefix cache (vLLM recomputes a prompt whose logprobs are asked for): the
    same bits each time, and every prompt and sampled-token logprob equal to the aligned shim's. `must_hit`: the
    prompts span cache blocks (the tiny model's blocks are small; Ring-mini's 512-token blocks are longer than
    these prompts)."""
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    prompts = mixed_prompts()
    llm = make_llm(
        checkpoint, dtype=dtype, enable_chunked_prefill=True, enable_prefix_caching=caching,
        max_num_batched_tokens=budget, enforce_eager=eager,
    )  # fmt: skip
    try:
        batch = served(generate(llm, prompts, 16, logprobs=0, prompt_logprobs=0))
        alone = [served(generate(llm, [prompts[i]], 16, logprobs=0, prompt_logprobs=0))[0] for i in PICKED]
        resent = [generate(llm, [prompts[i]], 16, logprobs=0)[0] for i in PICKED]
    finally:
        free(llm)
    differences = [where_they_differ(alone[n], batch[i]) for n, i in enumerate(PICKED)]
    unequal = sum(d is not None for d in differences)
    print(f"\n[{dtype}] aligned mode: {unequal} of {len(alone)} requests differ alone vs in the batch (bitwise)")
    for index, where in zip(PICKED, differences, strict=True):
        if where is not None:
            print(f"  request {index} ({len(prompts[index])} prompt tokens): {where}")
    hits = [o.num_cached_tokens or 0 for o in resent]
    cached = [
        (list(o.outputs[0].token_ids), [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]) for o in resent
    ]
    cache_unequal = sum(c != batch[i][:2] for c, i in zip(cached, PICKED, strict=True))
    print(f"[{dtype}] resent through the prefix cache: hits (tokens) {hits}; {cache_unequal} differ from the batch")
    shim_unequal = gap_to_the_shim(checkpoint, dtype, prompts, batch)
    assert unequal == 0
    assert not must_hit or any(hits), "no resent request hit the prefix cache"
    assert cache_unequal == 0
    assert shim_unequal == 0, f"{shim_unequal} token logprobs of the aligned shim differ from the engine's"


def gap_to_the_shim(checkpoint, dtype: str, prompts, outputs) -> int:
    """Issue 15's claim: the shim's `token_logprobs(aligned=True)` on each prompt + its generated tokens against the
    engine's logprobs of the same tokens (printed), and how many differ in any bit."""
    import torch

    from common_kernels import RingLinearForCausalLM

    shim = RingLinearForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), device="cuda").eval()
    ids, offsets = packed([prompt + tokens for prompt, (tokens, _, _) in zip(prompts, outputs, strict=True)])
    with torch.no_grad():
        logprobs = shim.token_logprobs(ids, cu_seqlens=offsets, aligned=True).cpu()
    engine = torch.tensor([x for (_, sampled, prompt_lp) in outputs for x in [0.0, *prompt_lp, *sampled]])
    mine = torch.cat([logprobs[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
    gap = (mine.double() - engine.double()).abs()
    first = [
        (i, len(prompt), int((gap[a:b] > 0).nonzero()[0]))
        for i, (prompt, a, b) in enumerate(zip(prompts, offsets[:-1], offsets[1:], strict=True))
        if (gap[a:b] > 0).any()
    ]
    if first:
        print(f"[{dtype}] first unequal position (request, prompt length, position): {first[:8]}")
    print(
        f"[{dtype}] aligned shim vs engine over {gap.numel()} tokens: unequal {(gap > 0).sum().item()}, "
        f"mean {gap.mean():.2e}, p99 {gap.quantile(0.99):.2e}, max {gap.max():.2e}"
    )
    return int((gap > 0).sum())
