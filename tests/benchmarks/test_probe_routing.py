"""The routing census's counting (the engine needs a GPU)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from benchmarks.probe_routing import RoutingCensus, install, uniform_distinct


def test_uniform_routing_of_a_64_token_decode_step_reaches_about_221_of_256_experts():
    assert uniform_distinct(256, 64 * 8) == pytest.approx(221.4, abs=0.1)
    assert uniform_distinct(256, 1) == pytest.approx(1.0)
    assert uniform_distinct(256, 8192 * 8) == pytest.approx(256.0)


def test_the_census_counts_distinct_experts_per_call_by_token_count():
    census = RoutingCensus()
    census.record(torch.tensor([[0, 1], [1, 2], [2, 3]]))  # 3 tokens, 4 experts
    census.record(torch.tensor([[5, 6], [5, 6], [5, 6]]))  # 3 tokens, every one on the same 2
    census.record(torch.tensor([[7, 8]]))
    rows = census.rows(experts=16, top_k=2)
    assert [(tokens, calls, mean) for tokens, calls, mean, _ in rows] == [(1, 1, 2.0), (3, 2, 3.0)]
    assert rows[1][3] == pytest.approx(uniform_distinct(16, 6))


def test_install_counts_every_call_of_vllms_expert_alignment_and_passes_it_on(monkeypatch):
    calls = []
    ops = types.SimpleNamespace(moe_align_block_size=lambda topk_ids, *rest: calls.append((topk_ids.shape, rest)))
    vllm = types.ModuleType("vllm")
    vllm._custom_ops = ops
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm._custom_ops", ops)
    census = RoutingCensus()
    install(census)
    ops.moe_align_block_size(torch.tensor([[0, 1], [0, 2]]), 256, 16, "sorted", "ids", "pad", None)
    assert calls == [((2, 2), (256, 16, "sorted", "ids", "pad", None))]
    assert census.by_tokens == {2: [3]}
