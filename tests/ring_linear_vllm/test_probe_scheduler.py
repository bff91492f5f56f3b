"""The scheduler probe (`benchmarks/probe_scheduler.py`) on vLLM 0.26's own scheduler, on the CPU: the layouts group
as vLLM groups them on the GPU machine, every request of a pass finishes, and a prompt sent again hits the cache."""

from __future__ import annotations

import pytest

from benchmarks.probe_scheduler import block_hasher, run_pass, scheduler_for


@pytest.fixture(scope="module")
def vllm_026(vllm_env):
    import vllm

    if not vllm.__version__.startswith("0.26."):  # the GPU machine's release, whose scheduler the probe times
        pytest.skip(f"the probe targets vLLM 0.26's scheduler; this is {vllm.__version__}")


@pytest.mark.parametrize("layout, groups", [("ring-linear", 5), ("softmax-twin", 1)])
def test_each_layout_groups_its_caches_as_vllm_does_and_serves_every_request(vllm_026, layout, groups):
    scheduler, kv_cache_config, _ = scheduler_for(layout, False, 1024 + 64, 4, kv_memory_gib=4)
    assert len(kv_cache_config.kv_cache_groups) == groups
    prompts = [[1000 + i] * 700 for i in range(6)]
    result = run_pass(scheduler, prompts, output_len=5, concurrency=4, hasher=None, tag="p")
    assert result["prompt_tokens"] == 4200 and result["hit_tokens"] == 0
    assert result["steps"] >= 5 and result["median_ms"] > 0
    assert not scheduler.requests  # every request finished and was freed


def test_stacking_the_linear_states_four_to_an_entry_leaves_two_groups_of_larger_blocks(vllm_026):
    """The layout `--stack 4` measures: 4 entries of 4 states beside the 4 softmax layers, one group of each."""
    scheduler, kv_cache_config, _ = scheduler_for("ring-linear", False, 4096 + 64, 4, kv_memory_gib=4, stack=4)
    groups = kv_cache_config.kv_cache_groups
    assert [type(g.kv_cache_spec).__name__ for g in groups] == ["FullAttentionSpec", "MambaSpec"]
    assert groups[0].kv_cache_spec.block_size == 2048 and len(groups[1].layer_names) == 4
    assert run_pass(scheduler, [[7] * 3000] * 4, output_len=3, concurrency=4, hasher=None, tag="s")["steps"] >= 3
    with pytest.raises(ValueError, match="--stack 3 must divide ring-linear's 16 linear layers"):
        scheduler_for("ring-linear", False, 4096 + 64, 4, kv_memory_gib=4, stack=3)


def test_with_prefix_caching_a_resent_prompt_hits_the_cache(vllm_026):
    scheduler, _, hash_block_size = scheduler_for("ring-linear", True, 2048 + 64, 4, kv_memory_gib=4)
    hasher = block_hasher(hash_block_size)
    prompts = [[2000 + i] * 1600 for i in range(4)]
    hits = [run_pass(scheduler, prompts, 4, 4, hasher, f"pass{p}")["hit_tokens"] for p in range(3)]
    assert hits[0] == 0 and hits[-1] > 0, hits
