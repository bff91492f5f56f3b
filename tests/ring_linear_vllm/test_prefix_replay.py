"""The replay-boundary stop (`ring_linear_vllm.prefix_replay`): a prefill chunk of our model ends at the last block
boundary a resend can resume from, through vLLM 0.26's own split on stand-in requests, and through its scheduler:
a resent prompt of whole blocks hits all but its last block."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from common_kernels import RingLinearConfig  # noqa: E402
from ring_linear_vllm import prefix_replay  # noqa: E402
from ring_linear_vllm.engine_config import PREFIX_CACHING_VERIFIED_ON  # noqa: E402

BLOCK = 512


@pytest.mark.parametrize(
    "start, n, num_tokens, expected",
    [
        (0, 4096, 4096, 3584),  # a prompt of whole blocks: stop one block short, where a resend resumes
        (0, 3584, 4000, 3584),  # not whole blocks: the replay boundary is vLLM's own stop already
        (3584, 512, 4096, 512),  # the last chunk starts on the boundary: nothing to cut
        (0, 2048, 4096, 2048),  # the budget cut the chunk below the boundary: left alone
        (4096, 1, 4097, 1),  # a decode step
        (0, 512, 512, 512),  # one block: no boundary before the last token
        (1024, 0, 4096, 0),  # vLLM's split gave nothing (the budget cannot reach a boundary)
    ],
)
def test_the_stop_is_the_last_block_boundary_before_the_last_token(start, n, num_tokens, expected):
    assert prefix_replay.replay_stop(start, n, num_tokens, BLOCK) == expected


@pytest.mark.parametrize(
    "start, n, num_tokens, expected",
    [
        (0, 4096, 4096, 3584),  # the block boundary comes first
        (3584, 512, 4096, 496),  # then the last 16-token boundary before the last token: 4,080
        (4080, 16, 4096, 16),
        (3584, 416, 4000, 400),  # 3,984
        (3584, 417, 4001, 416),  # 4,000, where vLLM's own tail stop cuts too
        (0, 100, 4096, 100),  # no boundary inside the chunk
    ],
)
def test_with_finer_hits_the_stop_is_also_the_last_hash_boundary_before_the_last_token(start, n, num_tokens, expected):
    assert prefix_replay.replay_stop(start, n, num_tokens, BLOCK, hash_block_size=16) == expected
    assert prefix_replay.replay_stop(start, n, num_tokens, BLOCK, hash_block_size=BLOCK) == min(
        n, prefix_replay.replay_stop(start, n, num_tokens, BLOCK)
    )


@pytest.fixture
def vllm_026(vllm_env):
    import vllm

    if not vllm.__version__.startswith(PREFIX_CACHING_VERIFIED_ON):
        pytest.skip(f"prefix caching (and with it the stop) is served on vLLM {PREFIX_CACHING_VERIFIED_ON}x only")


def stand_in_scheduler(model_type: str) -> SimpleNamespace:
    """What vLLM 0.26's split reads from its scheduler, in align mode without EAGLE or sub-block hashes."""
    return SimpleNamespace(
        cache_config=SimpleNamespace(block_size=BLOCK),
        use_eagle=False,
        hash_block_size=BLOCK,
        mamba_partial_cache_hit=False,
        vllm_config=SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(model_type=model_type))),
    )


def prompt(num_tokens: int, computed: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        num_computed_tokens=computed, num_prompt_tokens=num_tokens, num_tokens=num_tokens, shared_prefix_boundary=0
    )


def test_vllms_split_stops_our_whole_block_prompts_at_the_replay_boundary_and_no_one_elses(vllm_026):
    from vllm.v1.core.sched.scheduler import Scheduler

    prefix_replay.install()
    split = Scheduler._mamba_block_aligned_split
    prefix_replay.install()  # registration runs in every process, maybe more than once: one wrapper
    assert Scheduler._mamba_block_aligned_split is split and split.ring_linear
    ours, theirs = stand_in_scheduler(RingLinearConfig.model_type), stand_in_scheduler("qwen3_next")
    assert split(ours, prompt(4096), 4096) == 3584
    assert split(theirs, prompt(4096), 4096) == 4096  # vLLM's own behaviour for every other model
    assert split(ours, prompt(4096, computed=3072), 1024) == 512
    assert split(ours, prompt(4000), 4000) == split(theirs, prompt(4000), 4000) == 3584
    assert split(ours, prompt(4096), 3072, 1024) == 2560  # after a 1,024-token cache hit: the rest, less a block


def test_other_releases_are_left_alone(vllm_env):
    import vllm
    from vllm.v1.core.sched.scheduler import Scheduler

    prefix_replay.install()
    wrapped = getattr(getattr(Scheduler, "_mamba_block_aligned_split", None), "ring_linear", False)
    assert wrapped == vllm.__version__.startswith(PREFIX_CACHING_VERIFIED_ON)


def resend_hits(length: int, prefix_match_unit: int | None, ours: bool = True, stack: int = 1) -> list[int]:
    """Prompt tokens each of 4 prompts of `length` hit on its first and on its second send, through vLLM's scheduler
    and KV-cache manager on Ring-mini's cache layout (`ours=False`: the same scheduler with our marks taken off)."""
    from benchmarks.probe_scheduler import block_hasher, run_pass, scheduler_for

    scheduler, _, hash_block_size = scheduler_for("ring-linear", True, 4096 + 64, 4, 4, prefix_match_unit, stack)
    if not ours:
        scheduler.vllm_config.model_config.hf_config.model_type = "qwen3_next"
        for manager in scheduler.kv_cache_manager.coordinator.single_type_managers:
            manager.ring_linear_replay_tail = False
    hasher = block_hasher(hash_block_size)
    prompts = [[3000 + i] * length for i in range(4)]
    return [run_pass(scheduler, prompts, 4, 4, hasher, f"pass{p}")["hit_tokens"] // 4 for p in range(2)]


@pytest.mark.parametrize(
    "length, unit, expected",
    [(4096, 16, 4080), (4000, 16, 3984), (4001, 16, 4000), (4096, 64, 4032), (4096, None, 3584)],
)
def test_with_finer_hits_a_resent_prompt_resumes_at_its_last_hash_boundary(vllm_026, length, unit, expected):
    """`--prefix-match-unit`: vLLM keeps one state inside the prompt's last block, at `num_prompt_tokens // unit *
    unit` (4,096 and 4,000 for themselves: their ends, which no resend can use); ours keeps it one token earlier."""
    assert resend_hits(length, unit) == [0, expected]


def test_finer_hits_are_as_fine_with_the_states_stacked(vllm_026):
    """Why the plugin stacks under `--prefix-match-unit` (`engine_config.stack_for`): a resend resumes at the same
    token in 2,048-token blocks as in 512-token ones."""
    assert resend_hits(4096, 16, stack=4) == [0, 4080]
    assert resend_hits(4000, 16, stack=4) == [0, 3984]


def test_other_models_keep_vllms_own_partial_tail(vllm_026):
    # vLLM's tail at a prompt's end is no use to its resend: the hit falls back to the blocks a chunk ended on
    assert resend_hits(4001, 16, ours=False) == [0, 4000]  # 4,000 is inside the prompt: vLLM's own tail serves
    assert resend_hits(4096, 16, ours=False)[1] < 4080


@pytest.mark.parametrize("stack, hit", [(1, 3584), (4, 2048)], ids=["one_state_an_entry", "stacked"])
def test_a_resent_prompt_of_whole_blocks_hits_all_but_its_last_block(vllm_026, stack, hit):
    """8 blocks of 512 tokens each (or 2 of 2,048 with Ring-mini's states stacked 4 to an entry: why the plugin keeps
    one state an entry under whole-block caching, `engine_config.stack_for`)."""
    from benchmarks.probe_scheduler import block_hasher, run_pass, scheduler_for

    scheduler, _, hash_block_size = scheduler_for("ring-linear", True, 4096 + 64, 4, kv_memory_gib=4, stack=stack)
    hasher = block_hasher(hash_block_size)
    prompts = [[3000 + i] * 4096 for i in range(4)]
    first, second = (run_pass(scheduler, prompts, 4, 4, hasher, f"pass{p}") for p in range(2))
    assert first["hit_tokens"] == 0
    assert second["hit_tokens"] == 4 * hit, second  # without the stop: only where the first send's budget cut it
