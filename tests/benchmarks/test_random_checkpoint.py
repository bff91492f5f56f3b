"""The random-checkpoint writer: a released model's shapes cut to one layer group, loadable by the shim."""

from __future__ import annotations

import pytest
import torch

from benchmarks.random_checkpoint import write_random_checkpoint
from common_kernels import RingLinearForCausalLM
from common_kernels.config import RingLinearConfigError
from common_kernels.presets import preset_config


def test_a_ring_mini_layer_group_round_trips_through_the_shim(tmp_path):
    narrow = {"hidden_size": 256, "vocab_size": 512, "moe_intermediate_size": 32, "layer_group_size": 2}
    narrow |= {"pad_token_id": 511, "eos_token_id": 511}  # Ring-mini's ids lie past a 512-token vocabulary
    path = write_random_checkpoint(tmp_path / "mini", **narrow)
    model = RingLinearForCausalLM.from_pretrained(path)
    mini = preset_config("ring-mini-linear-2.0")
    assert model.config.num_hidden_layers == 2  # one group
    assert (model.config.head_dim, model.config.num_experts) == (mini.head_dim, mini.num_experts)
    assert model.dtype == torch.bfloat16


def test_a_depth_the_config_refuses_is_named_not_replaced(tmp_path):
    with pytest.raises(RingLinearConfigError, match="num_hidden_layers=0"):
        write_random_checkpoint(tmp_path / "none", layers=0)
