import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common_kernels import CheckpointError, RingLinearForCausalLM, expected_tensor_shapes, preset_config, tiny_config
from common_kernels.model.checkpoint import SAFE_WEIGHTS_INDEX_NAME, check_checkpoint, checkpoint_files


def tiny_model(dtype=torch.float32, **overrides):
    model = RingLinearForCausalLM(tiny_config(**overrides), dtype=dtype)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    for layer in model.model.layers[1:]:
        layer.mlp.gate.expert_bias.copy_(torch.randn(8) * 0.01)
    return model


def all_tensors(model):
    return dict(model.named_parameters()) | dict(model.named_buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shard_size", ["100KB", "50MB"])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype, shard_size):
    model = tiny_model(dtype)
    model.save_pretrained(tmp_path, max_shard_size=shard_size)
    sharded = (tmp_path / SAFE_WEIGHTS_INDEX_NAME).exists()
    assert sharded == (shard_size == "100KB")
    assert len(checkpoint_files(tmp_path)) > 1 if sharded else (tmp_path / "model.safetensors").exists()
    again = RingLinearForCausalLM.from_pretrained(tmp_path)
    assert again.dtype == dtype  # from config.json's torch_dtype
    before, after = all_tensors(model), all_tensors(again)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    ids = torch.randint(3, 64, (9,))
    assert torch.equal(model(ids), again(ids))


def test_file_holds_exactly_the_hf_names_and_an_fp32_router_bias(tmp_path):
    model = tiny_model(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(expected_tensor_shapes(model.config))
    bias_file = tmp_path / index["weight_map"]["model.layers.1.mlp.gate.expert_bias"]
    with safe_open(bias_file, framework="pt") as fh:
        assert fh.get_tensor("model.layers.1.mlp.gate.expert_bias").dtype == torch.float32
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bailing_moe_linear" and config["architectures"] == ["BailingMoeLinearV2ForCausalLM"]


def test_name_table_equals_the_modules_persistent_tensors():
    model = tiny_model()
    assert set(expected_tensor_shapes(model.config)) == set(model.state_dict())
    for name, shape in expected_tensor_shapes(model.config).items():
        assert tuple(model.state_dict()[name].shape) == shape, name


def test_tied_embeddings_have_no_lm_head(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert "lm_head.weight" not in expected_tensor_shapes(model.config)
    model.save_pretrained(tmp_path)
    again = RingLinearForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 64, (5,))
    assert torch.equal(model(ids), again(ids))


@pytest.mark.parametrize(
    "preset,total,active_non_embedding",
    [("ring-mini-linear-2.0", 16.42e9, 0.957e9), ("ring-flash-linear-2.0", 104.18e9, 6.16e9)],
)
def test_released_shapes_reproduce_the_paper_parameter_counts(preset, total, active_non_embedding):
    config = preset_config(preset)
    shapes = expected_tensor_shapes(config)
    count = sum(math.prod(s) for s in shapes.values())
    assert count == pytest.approx(total, rel=2e-3)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    inactive = (
        (config.num_experts - config.num_experts_per_tok)
        * per_expert
        * len([l for l in range(config.num_hidden_layers) if config.is_moe_layer(l)])
    )
    embeddings = 2 * config.vocab_size * config.hidden_size
    assert count - inactive - embeddings == pytest.approx(active_non_embedding, rel=1e-2)


def _rewrite(path, edit):
    """Apply `edit(tensors) -> tensors` to the single-file checkpoint at `path`."""
    tensors = load_file(path / "model.safetensors")
    save_file(edit(tensors), path / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors_are_all_named(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)

    def break_it(t):
        del t["model.layers.2.attention.key_layernorm.weight"]
        t["model.layers.0.attention.bogus.weight"] = torch.zeros(3)
        t["model.layers.1.attention.g_norm.weight"] = torch.zeros(65)
        return t

    _rewrite(tmp_path, break_it)
    with pytest.raises(CheckpointError) as info:
        RingLinearForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "missing tensor model.layers.2.attention.key_layernorm.weight (expected shape [16])" in message
    assert "unexpected tensor model.layers.0.attention.bogus.weight" in message
    assert "tensor model.layers.1.attention.g_norm.weight has shape [65], expected [64]" in message
    with pytest.raises(CheckpointError, match=r"missing tensor .*\n  \.\.\. and 2 more") as info:
        RingLinearForCausalLM.from_pretrained(tmp_path, report_all_errors=False)
    assert "unexpected tensor" not in str(info.value)


def test_derived_tables_and_mtp_layers_are_ignored(tmp_path):
    model = tiny_model(num_nextn_predict_layers=1)
    model.save_pretrained(tmp_path)

    def add_extras(t):
        t["model.layers.0.attention.slope"] = torch.zeros(4)
        t["model.layers.2.attention.rotary_emb.inv_freq"] = torch.zeros(4)
        t["model.layers.6.enorm.weight"] = torch.zeros(64)  # the MTP layer sits after the last decoder layer
        return t

    _rewrite(tmp_path, add_extras)
    check_checkpoint(model.config, tmp_path)
    again = RingLinearForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again(torch.tensor([5, 6])), model(torch.tensor([5, 6])))


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="neither"):
        check_checkpoint(tiny_config(), tmp_path)
    tiny_model().save_pretrained(tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="listed in model.safetensors.index.json but missing"):
        check_checkpoint(tiny_config(), tmp_path)
