"""The engine-invariance switch of aligned scoring (the settings themselves act on a GPU): an unknown engine is
refused naming the choices, a missing engine warns once and scoring goes on, and one process aligns with one
engine."""

from __future__ import annotations

import builtins

import pytest

from common_kernels.errors import InvalidInputError
from common_kernels.model import engine_invariance


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(engine_invariance, "_state", {"engine": None})


def test_an_unknown_engine_is_refused_with_the_choices(fresh_state):
    with pytest.raises(InvalidInputError, match="engine 'trt': aligned scoring matches one of vllm, sglang"):
        engine_invariance.use_engine_invariance("trt")


def test_a_missing_engine_warns_once_and_a_second_engine_is_refused(fresh_state, monkeypatch):
    real_import = builtins.__import__

    def no_engines(name, *args, **kwargs):
        if name.startswith(("vllm", "sglang")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_engines)
    with pytest.warns(UserWarning, match="aligned scoring without sglang installed"):
        assert engine_invariance.use_engine_invariance("sglang") is False
    assert engine_invariance.use_engine_invariance("sglang") is False  # no second warning, no error
    engine_invariance._state["engine"] = "vllm"
    with pytest.raises(InvalidInputError, match="already runs vllm's batch-invariant operators"):
        engine_invariance.use_engine_invariance("sglang")


def test_vllms_switch_is_set_only_while_vllm_initialises(fresh_state, monkeypatch):
    """An engine this process starts later must not inherit batch-invariant mode from a scoring call."""
    import os
    from types import SimpleNamespace

    seen = []
    fake = SimpleNamespace(init_batch_invariance=lambda: seen.append(os.environ.get("VLLM_BATCH_INVARIANT")))
    monkeypatch.setattr(engine_invariance, "_vllm_batch_invariance", lambda: fake)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    assert engine_invariance.use_engine_invariance("vllm") is True
    assert seen == ["1"] and "VLLM_BATCH_INVARIANT" not in os.environ


def test_aligned_scoring_names_an_unknown_engine_on_the_cpu_too():
    import torch

    from common_kernels import RingLinearForCausalLM, tiny_config

    model = RingLinearForCausalLM(tiny_config())
    with pytest.raises(InvalidInputError, match="engine 'sglng'"):
        model.token_logprobs(torch.tensor([1, 2, 3]), aligned=True, engine="sglng")
