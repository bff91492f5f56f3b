import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig

from common_kernels import PRESETS, RECONSTRUCTED, RingLinearConfig, RingLinearConfigError, preset_config, tiny_config

RELEASED = Path(__file__).parent.parent / "data" / "ring-mini-linear-2.0.config.json"


def test_released_config_parses_through_autoconfig_without_remote_code(tmp_path):
    shutil.copy(RELEASED, tmp_path / "config.json")
    config = AutoConfig.from_pretrained(tmp_path)  # auto_map names remote code that is not there
    assert type(config) is RingLinearConfig
    raw = json.loads(RELEASED.read_text())
    for field, value in raw.items():
        if field in ("auto_map", "torch_dtype", "transformers_version", "rope_scaling", "rope_theta", "architectures"):
            continue
        assert getattr(config, field) == value, field
    assert config.architectures == ["BailingMoeLinearV2ForCausalLM"]
    assert config.rope_settings().theta == 1e6 and config.rope_settings().kind == "default"
    assert config.softmax_layer_ids == [4, 9, 14, 19]
    assert config.linear_layer_ids == [l for l in range(20) if l not in (4, 9, 14, 19)]
    assert config.rotary_dim == 64 and config.linear_state_shape == (16, 128, 128)


def test_save_and_reload_keeps_every_field(tmp_path):
    config = preset_config("ring-mini-linear-2.0", linear_decay_convention="hf")
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert type(again) is RingLinearConfig
    assert again.to_diff_dict() == config.to_diff_dict()
    assert again.rope_settings() == config.rope_settings()


def test_presets_are_valid_and_mark_reconstructed_values():
    flash = preset_config("ring-flash-linear-2.0")
    assert flash.softmax_layer_ids == [7, 15, 23, 31] and flash.num_attention_heads == 32
    assert flash.rope_settings().theta == 600000 and flash.group_norm_size == 4  # the released flash config
    assert preset_config("ring-flash-linear-2.0-128k").rope_settings().theta == 1000000
    assert all(fields == frozenset() for fields in RECONSTRUCTED.values())
    assert set(RECONSTRUCTED) == set(PRESETS)
    with pytest.raises(KeyError, match="unknown preset"):
        preset_config("ring-tiny")


def test_a_preset_as_config_json_parses_back_to_the_preset(tmp_path):
    import json

    from common_kernels.presets import preset_json

    (tmp_path / "config.json").write_text(json.dumps(preset_json("ring-flash-linear-2.0", num_hidden_layers=16)))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is RingLinearConfig and loaded.num_hidden_layers == 16
    assert loaded.to_diff_dict() == preset_config("ring-flash-linear-2.0", num_hidden_layers=16).to_diff_dict()
    with pytest.raises(KeyError, match="unknown preset"):
        preset_json("ring-tiny")


def test_layer_placement_counts_trailing_layers_as_softmax():
    config = tiny_config(num_hidden_layers=7, layer_group_size=3)  # groups 0-2, 3-5, then layer 6 alone
    assert config.softmax_layer_ids == [2, 5, 6]


def test_yarn_rope_is_accepted():
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072}
    rope = preset_config("ring-mini-linear-2.0", rope_scaling=yarn).rope_settings()
    assert (rope.kind, rope.factor, rope.original_max_position_embeddings) == ("yarn", 4.0, 131072)


BAD_CONFIGS = [
    ({"group_norm_size": 3}, "group_norm_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"layer_group_size": 1}, "layer_group_size"),
    ({"layer_group_size": 21}, "layer_group_size"),
    ({"head_dim": 127}, "head_dim"),
    ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"n_group": 7}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"num_experts_per_tok": 129}, "num_experts_per_tok"),
    ({"first_k_dense_replace": 21}, "first_k_dense_replace"),
    ({"score_function": "softmax"}, "score_function"),
    ({"router_dtype": "bf16"}, "router_dtype"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 4096}}, "rope_scaling"),
    ({"use_bias": True}, "use_bias"),
    ({"use_qkv_bias": True}, "use_qkv_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"linear_decay_convention": "mlx"}, "linear_decay_convention"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": 2048.0}, "hidden_size"),
    # a quoted boolean is a non-empty string: Python would read "false" as true
    ({"linear_silu": "false"}, "linear_silu"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"partial_rotary_factor": "0.5"}, "partial_rotary_factor"),
    ({"first_k_dense_replace": 1.5}, "first_k_dense_replace"),
    ({"rope_scaling": "yarn"}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": "abc", "original_max_position_embeddings": 4096}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": "x"}}, "rope_scaling"),
    ({"rope_scaling": {"factor": 4.0}}, "rope_scaling"),
    ({"routed_scaling_factor": -1.0}, "routed_scaling_factor"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
    ({"eos_token_id": "x"}, "eos_token_id"),
    ({"eos_token_id": 157184}, "eos_token_id"),
    ({"pad_token_id": -5}, "pad_token_id"),
    ({"dtype": "int8"}, "dtype"),
    ({"dtype": "float17"}, "dtype"),
]


@pytest.mark.parametrize("overrides,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(RingLinearConfigError, match=rf"RingLinearConfig\.{field}="):
        preset_config("ring-mini-linear-2.0", **overrides)


def test_validate_catches_edits_made_after_construction():
    config = preset_config("ring-mini-linear-2.0")
    config.group_norm_size = 5
    with pytest.raises(RingLinearConfigError, match="must divide num_attention_heads\\*head_dim=2048"):
        config.validate()


def test_bad_released_config_fails_at_parse_time(tmp_path):
    raw = json.loads(RELEASED.read_text())
    raw["topk_group"] = 12
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(RingLinearConfigError, match="topk_group"):
        AutoConfig.from_pretrained(tmp_path)


def test_a_quoted_boolean_in_config_json_is_refused_by_name(tmp_path):
    raw = json.loads(RELEASED.read_text()) | {"linear_silu": "false"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(RingLinearConfigError, match=r"linear_silu='false': must be true or false"):
        AutoConfig.from_pretrained(tmp_path)


def test_a_config_json_without_a_math_field_says_which_value_it_takes(tmp_path, caplog):
    raw = json.loads(RELEASED.read_text())
    del raw["group_norm_size"], raw["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with caplog.at_level("WARNING"):
        config = AutoConfig.from_pretrained(tmp_path)
    assert config.group_norm_size == 4
    assert "does not state group_norm_size, rope_theta" in caplog.text and "group_norm_size=4" in caplog.text
    caplog.clear()
    shutil.copy(RELEASED, tmp_path / "config.json")
    with caplog.at_level("WARNING"):
        AutoConfig.from_pretrained(tmp_path)
    assert "does not state" not in caplog.text and "does not read" not in caplog.text  # the released config: none


def test_a_misspelt_field_in_config_json_is_named(tmp_path, caplog):
    raw = json.loads(RELEASED.read_text()) | {"partial_rotary_factr": 0.25}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with caplog.at_level("WARNING"):
        AutoConfig.from_pretrained(tmp_path)
    assert "fields Ring-linear-2.0 does not read: partial_rotary_factr" in caplog.text


def test_tensor_parallel_sizes_must_split_heads_and_norm_groups():
    config = preset_config("ring-mini-linear-2.0")  # 16 heads, 4 output-norm groups
    for tp in (1, 2, 4):
        config.check_tensor_parallel(tp)
    with pytest.raises(RingLinearConfigError, match=r"size 8 .*group_norm_size=4.*use one of \[1, 2, 4\]"):
        config.check_tensor_parallel(8)
    with pytest.raises(RingLinearConfigError, match=r"size 3 .*num_attention_heads=16"):
        config.check_tensor_parallel(3)
    with pytest.raises(RingLinearConfigError, match="positive integer"):
        config.check_tensor_parallel(0)
