"""vLLM's hybrid prefix caching ("align" mode) with the linear state, on a GPU: a request served from a cached
prefix gives the tokens and logprobs it gets with caching off.

In align mode vLLM keeps the linear state at block boundaries only where a prefill chunk ended or a decode
crossed one, and copies the cached state into the request's own slot before the step (`preprocess_mamba`); our
kernels then resume from that slot. Each workload runs in waves (a wave starts when the previous one finished,
so its blocks are cached) on one engine with caching on and one with caching off; the hits each wave got are
printed and, where the workload must hit, asserted. These passing on the GPU (RESULTS.md, run P) is what let
prefix caching follow vLLM's own setting (`ring_linear_vllm.engine_config.check_prefix_caching`).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable

import pytest

from common_kernels.model.checkpoint import read_config

pytest.importorskip("vllm")

from vllm_runs import (  # noqa: E402
    RELEASED_CONFIG,
    assert_finite_logprobs,
    assert_same,
    free,
    generate,
    make_llm,
    prompts_of,
    tokens_and_logprobs,
)

from ring_linear_vllm.engine_config import stack_for  # noqa: E402

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


@pytest.fixture(autouse=True)
def _exact_products(exact_fp32_products):
    """Exact fp32 products in our kernels: a request split two ways then differs only in its summation order."""


# A wave: the prompts to send, made from the previous wave's outputs (token ids per request) in the same engine.
Wave = Callable[[list[list[int]]], list[list[int]]]


def block_size(llm) -> int:
    """The block size vLLM settled on (in align mode also the linear state's caching granularity)."""
    return llm.llm_engine.vllm_config.cache_config.block_size


def run_waves(llm, waves: list[Wave], max_tokens: int) -> tuple[list, list[int]]:
    """Every wave in turn; each request's (tokens, logprobs) and its prefix-cache hit in tokens."""
    results, hits, previous = [], [], []
    for wave in waves:
        outputs = generate(llm, wave(previous), max_tokens, logprobs=0)
        results += tokens_and_logprobs(outputs)
        hits += [o.num_cached_tokens or 0 for o in outputs]
        previous = [list(o.outputs[0].token_ids) for o in outputs]
    return results, hits


def fixed(prompts: list[list[int]]) -> Wave:
    return lambda _previous: prompts


def workloads(bs: int) -> dict[str, tuple[list[Wave], bool]]:
    """name -> (waves, whether caching must hit), sized from the block size `bs`."""
    rng = random.Random(21)
    same = prompts_of(22, [5 * bs + 7])[0]
    whole = prompts_of(36, [6 * bs])[0]  # ends on a boundary: the replay stop keeps a state one block short
    turns = {"prompts": prompts_of(23, [3 * bs + 5, 2 * bs, 4 * bs + 1])}

    def next_turn(seed: int) -> Wave:  # each conversation so far + its last answer + a new user message
        def wave(answers: list[list[int]]) -> list[list[int]]:
            users = prompts_of(seed, [bs // 2 + 3] * len(answers))
            turns["prompts"] = [p + a + u for p, a, u in zip(turns["prompts"], answers, users, strict=True)]
            return turns["prompts"]

        return wave

    def shared_prefix(length: int, seed: int) -> list[Wave]:
        prefix = prompts_of(seed, [length])[0]
        suffixes = prompts_of(seed + 1, [rng.randint(1, 2 * bs) for _ in range(7)])
        tails = [prefix + s for s in suffixes]
        return [fixed(tails[:1]), fixed(tails[1:3]), fixed(tails[3:])]

    return {
        "the same prompt 9 times": ([fixed([same]), fixed([same] * 8)], True),
        "a prompt of whole blocks, resent": ([fixed([whole]), fixed([whole] * 3)], True),
        "multi-turn, each turn extending the last": ([fixed(turns["prompts"]), next_turn(24), next_turn(25)], True),
        "a shared prefix ending mid-block": (shared_prefix(4 * bs + bs // 2, 30), False),
        "a shared prefix ending on a block boundary": (shared_prefix(4 * bs, 32), False),
        "a shared prefix one token past a boundary": (shared_prefix(4 * bs + 1, 34), False),
    }


# The tiny model's block in fp32 (`_align_hybrid_block_size`: 16 x ceil(state page / (16 x KV bytes per token))
# = 16 x ceil(4 x 16 x 16 x 4 B / (16 x 2 x 2 x 16 x 4 B)) = 16 tokens), times the states stacked in one cache
# entry (`stack_for`: hits inside a block stack 2, whole-block hits 1 unless RING_LINEAR_STACKED_STATES=1): the
# workloads are sized from it.
TINY_FP32_BLOCK = 16
# Ring-mini's block in bf16: its 1 MiB fp32 state page over the GQA layers' 2 KiB of KV per token.
RING_MINI_BLOCK = 512


def expected_block(model, one_state_block: int, fine_grained: bool = False) -> int:
    """The block vLLM must pick for the checkpoint folder `model`: `one_state_block` times the states per entry (the
    engines here keep the default budget, which reaches a stacked block)."""
    return one_state_block * stack_for(read_config(model), caching="fine" if fine_grained else "block")


def compare_cached_with_uncached(model, max_tokens: int, **settings) -> int:
    """Each workload on a caching engine, then on a cache-off one with the same settings; returns the total hit."""
    llm = make_llm(model, enable_prefix_caching=True, **settings)
    try:
        bs = block_size(llm)
        cached = {name: run_waves(llm, waves, max_tokens) for name, (waves, _) in workloads(bs).items()}
    finally:
        free(llm)
    want = expected_block(model, TINY_FP32_BLOCK, fine_grained="prefix_match_unit" in settings)
    assert bs == want, f"vLLM chose {bs}-token blocks: the workloads' sizes assume {want}"
    llm = make_llm(model, enable_prefix_caching=False, **settings)
    try:
        uncached = {name: run_waves(llm, waves, max_tokens)[0] for name, (waves, _) in workloads(bs).items()}
    finally:
        free(llm)
    print(f"\nblock size {bs}")
    for name, (_, must_hit) in workloads(bs).items():
        got, hits = cached[name]
        print(f"  {name}: cache hits per request (tokens) {hits}")
        assert_same(got, uncached[name], name)
        if must_hit:
            assert any(hits), f"{name}: no request hit the prefix cache"
    return sum(sum(hits) for _, hits in cached.values())


def test_cache_hits_give_the_tokens_and_logprobs_of_caching_off(tiny_trained):
    assert compare_cached_with_uncached(tiny_trained, 24) > 0


@pytest.mark.parametrize("extra", [0, 1])
def test_cache_hits_across_chunked_prefill_boundaries(tiny_trained, extra):
    """Steps of one block (align mode's smallest budget) and one block plus a token, so chunks end on every
    block boundary and a cached prefix resumes mid-budget."""
    budget = expected_block(tiny_trained, TINY_FP32_BLOCK) + extra
    total = compare_cached_with_uncached(
        tiny_trained, 8, max_num_batched_tokens=budget, enable_chunked_prefill=True, max_num_seqs=16
    )
    assert total > 0


def test_fine_grained_hits_give_the_tokens_and_logprobs_of_caching_off(tiny_trained):
    """`--prefix-match-unit 4` inside the tiny model's blocks (32 tokens, its states stacked 2 to an entry): hits
    resume from the state kept at the last 4-token boundary before a prompt's last token
    (`ring_linear_vllm.prefix_replay`), mid-block."""
    assert compare_cached_with_uncached(tiny_trained, 24, prefix_match_unit=4) > 0


def test_eviction_and_preemption_under_64_concurrent_requests(tiny_trained):
    """A pool too small for 64 requests: cached blocks are evicted and running requests preempted, and every
    request still gets the tokens of an unconstrained cache-off run."""
    rng = random.Random(26)
    prefixes = prompts_of(27, [rng.randint(40, 200) for _ in range(8)])
    prompts = [prefixes[i % 8] + s for i, s in enumerate(prompts_of(28, [rng.randint(1, 150) for _ in range(64)]))]
    llm = make_llm(tiny_trained, enable_prefix_caching=False)
    try:
        want = tokens_and_logprobs(generate(llm, prompts, 32, logprobs=0))
    finally:
        free(llm)
    # 200 blocks of 16 tokens, one state an entry (the 3 KV-cache groups share them): too few for 64 requests, enough
    # that some cached prefixes survive (vLLM 0.26's scheduler and cache manager, run on a CPU with fake outputs: at
    # 48 blocks every hit was evicted, at 200 a share of the requests hit); stacked, blocks hold `stack` times the
    # tokens for fewer groups, so the pool shrinks by that factor to keep the pressure
    blocks = 200 // stack_for(read_config(tiny_trained), caching="block")
    llm = make_llm(tiny_trained, enable_prefix_caching=True, num_gpu_blocks_override=blocks, max_num_batched_tokens=256)
    try:
        generate(llm, prompts[:8], 32, logprobs=0)  # cache the prefixes, then crowd them out
        outputs = generate(llm, prompts, 32, logprobs=0)
        preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        free(llm)
    hits = [o.num_cached_tokens or 0 for o in outputs]
    print(f"\npreemptions: {preemptions}; requests that hit the cache: {sum(h > 0 for h in hits)}/64")
    assert preemptions > 0, "no request was preempted: lower num_gpu_blocks_override"
    assert any(hits), "no request hit the cache: raise num_gpu_blocks_override"
    assert_same(tokens_and_logprobs(outputs), want, "eviction and preemption with caching")


def test_ring_mini_caches_the_state_per_block_with_cuda_graphs(tmp_path):
    """The released Ring-mini shapes (dummy weights, bf16, CUDA graphs): vLLM unifies the 1 MiB fp32 state page
    with the GQA layers' KV pages into 512-token blocks (2,048 with 4 states stacked to an entry), so a resent
    prompt of 4 blocks less 48 tokens resumes after 3 blocks, and so does a resent prompt of exactly 4 blocks (the
    replay stop kept its state one block short on the first send)."""
    shutil.copy(RELEASED_CONFIG, tmp_path / "config.json")
    want = expected_block(tmp_path, RING_MINI_BLOCK)
    llm = make_llm(
        tmp_path, dtype="bfloat16", load_format="dummy", enable_prefix_caching=True, enforce_eager=False,
        max_model_len=4 * want + 64, max_num_seqs=8, gpu_memory_utilization=0.6,
    )  # fmt: skip
    try:
        rng = random.Random(29)
        sends = {}
        for length in (4 * want - 48, 4 * want):
            prompt = [rng.randrange(1000, 150000) for _ in range(length)]
            sends[length] = [generate(llm, [prompt], 16, logprobs=0)[0] for _ in range(2)]
        bs = block_size(llm)
    finally:
        free(llm)
    print(f"\nRing-mini block size {bs}")
    assert bs == want
    for length, (first, second) in sends.items():
        hits = (first.num_cached_tokens, second.num_cached_tokens)
        print(f"  {length}-token prompt: hits on the first send {hits[0]}, second {hits[1]}")
        assert (first.num_cached_tokens or 0) == 0, length
        assert second.num_cached_tokens == 3 * want, length
        assert_finite_logprobs(second, 16)


def test_ring_mini_fine_grained_hits_resume_inside_a_block_with_cuda_graphs(tmp_path):
    """Ring-mini with `--prefix-match-unit 16`: a resent 2,048-token prompt resumes at 2,032 (not 1,536), and a turn
    that extends a 2,000-token prompt resumes at 1,984."""
    shutil.copy(RELEASED_CONFIG, tmp_path / "config.json")
    llm = make_llm(
        tmp_path, dtype="bfloat16", load_format="dummy", enable_prefix_caching=True, enforce_eager=False,
        max_model_len=4096, max_num_seqs=8, gpu_memory_utilization=0.6, prefix_match_unit=16,
    )  # fmt: skip
    try:
        rng = random.Random(30)
        whole = [rng.randrange(1000, 150000) for _ in range(2048)]
        resent = [generate(llm, [whole], 16, logprobs=0)[0] for _ in range(2)]
        turn = [rng.randrange(1000, 150000) for _ in range(2000)]
        first = generate(llm, [turn], 16, logprobs=0)[0]
        extended = generate(llm, [turn + list(first.outputs[0].token_ids) + [1234] * 40], 16, logprobs=0)[0]
    finally:
        free(llm)
    hits = [o.num_cached_tokens or 0 for o in (*resent, first, extended)]
    print(f"\nRing-mini, 16-token hits: resend {hits[:2]}, turn and its extension {hits[2:]}")
    assert hits == [0, 2032, 0, 1984]
    assert_finite_logprobs(resent[1], 16)
