"""`RING_LINEAR_STACKED_STATES=1` (opt-in, not yet verified on a GPU): consecutive linear layers keep their states in
one vLLM cache entry, so vLLM makes one KV-cache group of them instead of one per softmax-layer count (Ring-mini: 2
groups instead of 5), and each layer reads its row of the entry's pool."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from common_kernels.serving import STACKED_STATES_SWITCH  # noqa: E402

RELEASED_CONFIG = Path(__file__).parents[1] / "data" / "ring-mini-linear-2.0.config.json"


@pytest.fixture
def released_dir(tmp_path):
    shutil.copy(RELEASED_CONFIG, tmp_path / "config.json")
    return tmp_path


@pytest.fixture
def stacked(monkeypatch):
    monkeypatch.setenv(STACKED_STATES_SWITCH, "1")


def test_ring_mini_stacks_four_states_to_an_entry_of_a_2048_token_block(vllm_tools, released_dir, stacked, caplog):
    from ring_linear_vllm.engine_config import min_block_tokens, states_per_entry
    from ring_linear_vllm.model import RingLinearForCausalLM

    caplog.set_level(logging.WARNING, logger="ring_linear_vllm.engine_config")
    cfg = vllm_tools.engine_config(
        released_dir, dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=2048
    )
    assert states_per_entry(cfg) == 4
    assert RingLinearForCausalLM.get_mamba_state_shape_from_config(cfg) == ((4, 16, 128, 128),)
    # one 4 MiB fp32 entry a page: the softmax blocks that vLLM's CUDA platform sizes from the model's state shape grow
    # to match (2 KiB of bf16 KV a token and layer), and the budget check follows
    assert min_block_tokens(cfg) == 2048
    assert "states are stacked 4 to a cache entry" in caplog.text and "not yet verified on a GPU" in caplog.text


def test_without_the_switch_or_with_pipeline_stages_or_aligned_mode_each_layer_keeps_its_own_entry(
    vllm_tools, released_dir, monkeypatch, caplog
):
    from ring_linear_vllm.engine_config import states_per_entry

    cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16")
    assert states_per_entry(cfg) == 1
    monkeypatch.setenv(STACKED_STATES_SWITCH, "1")
    cfg.parallel_config.pipeline_parallel_size = 2  # an entry's layers could sit on two ranks
    assert states_per_entry(cfg) == 1
    cfg.parallel_config.pipeline_parallel_size = 1
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")  # its window buffers are not tested stacked
    assert states_per_entry(cfg) == 1
    monkeypatch.delenv("RING_LINEAR_ALIGNED")
    assert states_per_entry(cfg) == 4
    monkeypatch.setenv(STACKED_STATES_SWITCH, "stacked")  # a typo is refused, not read as off
    with pytest.raises(ValueError, match="RING_LINEAR_STACKED_STATES='stacked' is not understood"):
        states_per_entry(cfg)


def test_each_entry_has_one_spec_and_its_other_layers_none(vllm_tools, tiny_dir, stacked):
    """The tiny model: linear layers 0, 1, 3 and 4 beside softmax layers 2 and 5, so two to an entry."""
    cfg = vllm_tools.engine_config(tiny_dir)
    model = vllm_tools.build_model(cfg)
    linear = {i: layer.attention for i, layer in enumerate(model.model.layers) if layer.is_linear}
    assert sorted(linear) == [0, 1, 3, 4]
    specs = {i: layer.get_kv_cache_spec(cfg) for i, layer in linear.items()}
    assert specs[1] is None and specs[4] is None
    assert specs[0].shapes == specs[3].shapes == ((2, 4, 16, 16),)
    assert [(layer.entry_row, layer.entry_owner) for layer in linear.values()] == [
        (0, "model.layers.0.attention"), (1, "model.layers.0.attention"),
        (0, "model.layers.3.attention"), (1, "model.layers.3.attention"),
    ]  # fmt: skip


def test_stacked_layers_give_the_shims_outputs_each_on_its_own_row(vllm_tools, tiny_dir, stacked):
    """Every linear layer of a mixed step (decode, one-token prompt, new prompt, second chunk of a chunked prefill;
    every slot stale) against the shim: a layer that read or wrote another's row would differ."""
    layers = (0, 1, 3, 4)
    got, want = vllm_tools.mixed_step_output(tiny_dir, layers), vllm_tools.mixed_step_reference(tiny_dir, layers)
    err = (got - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), err
