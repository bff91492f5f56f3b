"""The engine-neutral serving pieces besides the step: the state a rank holds, the refused settings, the
checkpoint-loading loop (its checks, not an engine's loader) and the router gate."""

from __future__ import annotations

import pytest
import torch

from common_kernels import CheckpointError, RingLinearConfigError, decay_rates, expected_tensor_shapes, tiny_config
from common_kernels.presets import preset_config
from common_kernels.serving import (
    RouterGate,
    check_serving_settings,
    linear_state_dtype,
    linear_state_shape,
    load_checkpoint_tensors,
    rank_decay_rates,
)

MINI = preset_config("ring-mini-linear-2.0")


def test_a_rank_holds_its_share_of_the_heads_and_their_decays():
    assert linear_state_shape(MINI, 1) == (16, 128, 128) and linear_state_shape(MINI, 4) == (4, 128, 128)
    for layer in (0, 7):
        shards = [rank_decay_rates(MINI, layer, 4, rank) for rank in range(4)]
        assert torch.equal(torch.cat(shards), decay_rates(MINI, layer))


@pytest.mark.parametrize(
    ("requested", "dtype"),
    [(None, torch.float32), ("auto", torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16),
     (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_auto_state_dtype_is_fp32_and_bf16_is_honoured(requested, dtype):
    assert linear_state_dtype(requested) == dtype


@pytest.mark.parametrize("requested", ["float16", "fp8", torch.float16])
def test_other_state_dtypes_are_refused_naming_the_setting_and_the_choices(requested):
    with pytest.raises(ValueError, match="--state-dtype '.*' is not supported for the linear-attention state"):
        linear_state_dtype(requested, "--state-dtype")
    with pytest.raises(ValueError, match="use one of auto, float32, bfloat16"):
        linear_state_dtype(requested)


def test_serving_refusals_name_the_fix():
    check_serving_settings(MINI, 4, pp_size=2)
    with pytest.raises(RingLinearConfigError, match=r"use one of \[1, 2, 4\]"):
        check_serving_settings(MINI, 3)
    with pytest.raises(ValueError, match="speculative decoding is not supported.*drop --speculative-algorithm"):
        check_serving_settings(MINI, 1, speculative_flag="--speculative-algorithm")
    with pytest.raises(ValueError, match="pipeline parallel size 2 is not supported.*use pipeline parallel size 1"):
        check_serving_settings(MINI, 1, pp_size=2, pipeline_parallel_supported=False)
    with pytest.raises(ValueError, match="disaggregated prefill is not supported.*drop --kv-transfer-config"):
        check_serving_settings(MINI, 1, kv_transfer_flag="--kv-transfer-config")


def test_the_loading_loop_checks_names_and_shapes_and_leaves_placing_to_the_engine():
    config = tiny_config()
    shapes = expected_tensor_shapes(config)
    name = next(iter(shapes))
    placed = []

    def place(n, t):
        placed.append(n)
        return "engine." + n

    weights = [(n, torch.zeros(s)) for n, s in list(shapes.items())[:3]]
    assert load_checkpoint_tensors(weights, config, place) == {"engine." + n for n, _ in weights}
    assert load_checkpoint_tensors(weights, config, place, skip=lambda n: n == name) == {
        "engine." + n for n, _ in weights[1:]
    }
    with pytest.raises(CheckpointError, match=rf"{name!r} has shape \(1,\), the config implies"):
        load_checkpoint_tensors([(name, torch.zeros(1))], config, place)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight_scale'"):
        load_checkpoint_tensors([("model.extra.weight_scale", torch.zeros(1))], config, place)
    extra = load_checkpoint_tensors(
        [("model.extra.weight_scale", torch.zeros(1))], config, place, load_extra=lambda n, t: "engine.scale"
    )
    assert extra == {"engine.scale"}


def test_the_router_gate_computes_fp32_logits_from_bf16_activations():
    config = tiny_config()
    gate = RouterGate(config)
    assert gate.weight.dtype == torch.float32 and gate.expert_bias.dtype == torch.float32
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(3, config.hidden_size).to(torch.bfloat16)
    logits = gate(x)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, x.float() @ gate.weight.T)
