"""The stacked layout: consecutive linear layers keep their states in one vLLM cache entry, so vLLM makes one KV-cache
group of them instead of one per softmax-layer count (Ring-mini: 2 groups instead of 5), and each layer reads its row of
the entry's pool. `RING_LINEAR_STACKED_STATES` unset stacks where prefix caching loses least by it; 1 and 0 decide."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from common_kernels.serving import STACKED_STATES_SWITCH  # noqa: E402

RELEASED_CONFIG = Path(__file__).parents[1] / "data" / "ring-mini-linear-2.0.config.json"
OURS = "vllm.ring_linear_vllm.engine_config"  # the logger that says which layout was chosen


@pytest.fixture
def released_dir(tmp_path):
    shutil.copy(RELEASED_CONFIG, tmp_path / "config.json")
    return tmp_path


@pytest.fixture
def stacked(monkeypatch):
    monkeypatch.setenv(STACKED_STATES_SWITCH, "1")


@pytest.fixture
def caching_served(monkeypatch):
    """The vLLM version whose prefix caching is served (others turn it off before the layout is chosen)."""
    from ring_linear_vllm import engine_config

    monkeypatch.setattr(engine_config.vllm, "__version__", "0.26.0")


def test_ring_mini_stacks_four_states_to_an_entry_of_a_2048_token_block(
    vllm_tools, released_dir, stacked, caching_served, caplog
):
    from ring_linear_vllm.engine_config import min_block_tokens, states_per_entry
    from ring_linear_vllm.model import RingLinearForCausalLM

    caplog.set_level(logging.INFO, logger=OURS)
    cfg = vllm_tools.engine_config(
        released_dir, dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=2048
    )
    assert states_per_entry(cfg) == 4
    assert RingLinearForCausalLM.get_mamba_state_shape_from_config(cfg) == ((4, 16, 128, 128),)
    # one 4 MiB fp32 entry a page: the softmax blocks that vLLM's CUDA platform sizes from the model's state shape grow
    # to match (2 KiB of bf16 KV a token and layer), and the budget check follows
    assert min_block_tokens(cfg) == 2048
    assert "states are stacked 4 to a cache entry" in caplog.text and f"{STACKED_STATES_SWITCH}=0 keeps" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == OURS]
    # a budget below the stacked block is refused naming both ways out
    with pytest.raises(ValueError, match=rf"at least 2048 tokens \(4 layers' state page, {STACKED_STATES_SWITCH}=1\), "
                       rf"more than --max-num-batched-tokens 1024: raise it to 2048 or more, or unset "
                       rf"{STACKED_STATES_SWITCH}, or pass --no-enable-prefix-caching"):  # fmt: skip
        vllm_tools.engine_config(
            released_dir, dtype="bfloat16", enable_prefix_caching=True, max_num_batched_tokens=1024
        )


def test_unset_the_layout_is_stacked_where_prefix_caching_loses_least_by_it(
    vllm_tools, released_dir, caching_served, monkeypatch, caplog
):
    """Caching off: stacked. Hits of whole blocks: one state an entry (stacked blocks would make them 4 times
    coarser), said in one info line. Hits inside a block (`--prefix-match-unit`): stacked, if the token budget reaches
    the stacked block, which align mode needs."""
    from vllm.config import CacheConfig

    from ring_linear_vllm.engine_config import min_block_tokens, states_per_entry

    monkeypatch.delenv(STACKED_STATES_SWITCH, raising=False)
    caplog.set_level(logging.INFO, logger=OURS)

    def layout(**settings):
        cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16", **settings)
        return states_per_entry(cfg), min_block_tokens(cfg)

    assert layout(enable_prefix_caching=False) == (4, 2048)
    caplog.clear()
    assert layout(enable_prefix_caching=True, max_num_batched_tokens=2048) == (1, 512)
    assert "they make 2048-token blocks, too coarse for prefix-cache hits of whole blocks" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == OURS]
    if "prefix_match_unit" not in CacheConfig.__dataclass_fields__:
        return  # this vLLM has no hits inside a block
    assert layout(enable_prefix_caching=True, max_num_batched_tokens=2048, prefix_match_unit=16) == (4, 2048)
    caplog.clear()
    assert layout(enable_prefix_caching=True, max_num_batched_tokens=1024, prefix_match_unit=16) == (1, 512)
    assert "2048-token blocks, more than this token budget (--max-num-batched-tokens 1024)" in caplog.text


def test_with_the_switch_off_or_with_pipeline_stages_or_aligned_mode_each_layer_keeps_its_own_entry(
    vllm_tools, released_dir, monkeypatch, caplog
):
    from ring_linear_vllm.engine_config import note_stacked_states, states_per_entry

    monkeypatch.setenv(STACKED_STATES_SWITCH, "0")
    cfg = vllm_tools.engine_config(released_dir, dtype="bfloat16")
    assert states_per_entry(cfg) == 1
    monkeypatch.setenv(STACKED_STATES_SWITCH, "1")
    cfg.parallel_config.pipeline_parallel_size = 2  # an entry's layers could sit on two ranks
    assert states_per_entry(cfg) == 1
    caplog.set_level(logging.INFO, logger=OURS)
    note_stacked_states(cfg)  # asked for and not given: a warning that says why
    assert [r.levelname for r in caplog.records if r.name == OURS] == [
        "WARNING"
    ] and "needs pipeline parallelism 1" in caplog.text
    caplog.clear()
    monkeypatch.delenv(STACKED_STATES_SWITCH)
    note_stacked_states(cfg)  # the default where it cannot apply: said, not warned
    assert [r.levelname for r in caplog.records if r.name == OURS] == ["INFO"]
    monkeypatch.setenv(STACKED_STATES_SWITCH, "1")
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
