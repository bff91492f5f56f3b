"""Saving never loses the previous checkpoint, and every unreadable config or shard is named: the atomic folder
swap, an interrupted save, a user's own files kept, and the config and shard errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from common_kernels import CheckpointError, RingLinearConfigError, RingLinearForCausalLM, tiny_config
from common_kernels.model import checkpoint as checkpoint_module


def _model(seed: int) -> RingLinearForCausalLM:
    model = RingLinearForCausalLM(tiny_config())
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def _same_weights(a: RingLinearForCausalLM, b: RingLinearForCausalLM) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_save_interrupted_mid_shard_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = _model(0)
    old.save_pretrained(path, max_shard_size="100KB")
    before = sorted(p.name for p in path.iterdir())
    written = []

    def failing_save_file(tensors, filename, metadata=None):
        if written:  # the second shard: half a file, then the process "dies"
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 100)
            raise OSError("disk full")
        written.append(filename)
        return real_save_file(tensors, filename, metadata=metadata)

    real_save_file = checkpoint_module.save_file
    monkeypatch.setattr(checkpoint_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        _model(1).save_pretrained(path, max_shard_size="100KB")
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == before
    assert _same_weights(RingLinearForCausalLM.from_pretrained(path), old)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folder left behind


def test_a_completed_save_replaces_the_checkpoint_and_keeps_the_users_own_files(tmp_path):
    path = tmp_path / "ckpt"
    _model(0).save_pretrained(path, max_shard_size="100KB")
    (path / "NOTES.md").write_text("mine")
    new = _model(1)
    new.save_pretrained(path)  # one file now: the old shards and index must not linger
    assert (path / "NOTES.md").read_text() == "mine"
    assert not (path / "model.safetensors.index.json").exists() and (path / "model.safetensors").is_file()
    assert _same_weights(RingLinearForCausalLM.from_pretrained(path), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_swap_without_an_atomic_exchange_gives_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "_exchange", lambda a, b: False)
    path = tmp_path / "ckpt"
    _model(0).save_pretrained(path)
    new = _model(1)
    new.save_pretrained(path)
    assert _same_weights(RingLinearForCausalLM.from_pretrained(path), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("not a folder")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        _model(0).save_pretrained(tmp_path / "ckpt")


def _saved(tmp_path):
    path = tmp_path / "ckpt"
    _model(0).save_pretrained(path, max_shard_size="100KB")
    return path


def test_a_folder_without_config_json_is_named(tmp_path):
    path = _saved(tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt: no config.json"):
        RingLinearForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        RingLinearForCausalLM.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("num_hidden_layers"), r"config.json: the config does not state num_hidden_layers"),
        (lambda c: c.update(model_type="llama"), r"config.json: model_type 'llama' is not a Ring-linear config"),
        (lambda c: c.update(num_attention_heads=0), r"config.json: .*num_attention_heads=0"),
    ],
)
def test_a_config_missing_a_shape_field_or_of_another_type_is_named(tmp_path, edit, message):
    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RingLinearConfigError, match=message):
        RingLinearForCausalLM.from_pretrained(path)


def test_bad_json_is_named(tmp_path):
    path = _saved(tmp_path)
    (path / "config.json").write_text('{"vocab_size": ')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        RingLinearForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_truncated_or_corrupt_shard_is_named(tmp_path, damage):
    path = _saved(tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: unreadable safetensors file"):
        RingLinearForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("index", ["{bad", "[]", '{"metadata": {}}', '{"weight_map": {"a": 3}}'])
def test_a_broken_index_is_named(tmp_path, index):
    path = _saved(tmp_path)
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a safetensors index"):
        RingLinearForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("vocab_size", "64", r"vocab_size='64': must be an integer"), ("rms_norm_eps", "1e-6", "must be a number"),
     ("num_shared_experts", True, "must be an integer"), ("rope_scaling", "yarn", "must be an object")],
)  # fmt: skip
def test_a_field_of_the_wrong_json_type_is_named(tmp_path, field, value, message):
    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RingLinearConfigError, match=message):
        RingLinearForCausalLM.from_pretrained(path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(RingLinearConfigError, match="must be a JSON object"):
        RingLinearForCausalLM.from_pretrained(path)


def test_a_folder_holding_folders_is_never_replaced_or_copied(tmp_path):
    """Saving over a folder that is not a checkpoint (a project, a home folder) is refused before anything is
    written or copied; a file where a parent folder should be is named."""
    target = tmp_path / "project"
    (target / "src").mkdir(parents=True)
    (target / "main.py").write_text("mine")
    with pytest.raises(CheckpointError, match=r"project: holds folders \(src\), so it is not a checkpoint folder"):
        _model(0).save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["main.py", "src"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="a file stands where a folder of this path should be"):
        _model(0).save_pretrained(tmp_path / "afile" / "ckpt")


def test_kept_files_are_hard_links_not_copies(tmp_path):
    path = _saved(tmp_path)
    (path / "NOTES.md").write_text("mine")
    inode = (path / "NOTES.md").stat().st_ino
    _model(1).save_pretrained(path)
    assert (path / "NOTES.md").stat().st_ino == inode


def test_a_link_to_a_checkpoint_folder_saves_into_the_folder(tmp_path):
    real = _saved(tmp_path)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    new = _model(1)
    new.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and _same_weights(RingLinearForCausalLM.from_pretrained(real), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "link"]


def _rewrite_shard(shard, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_a_tensor_that_is_not_floating_point_is_named(tmp_path, dtype):
    """An int32 weight would be cast into the model's dtype (integers in the checkpoint: zeros, or worse)."""
    path = _saved(tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[0]
    name = {}

    def to_dtype(tensors):
        name["tensor"] = next(iter(tensors))
        tensors[name["tensor"]] = tensors[name["tensor"]].to(dtype)

    _rewrite_shard(shard, to_dtype)
    with pytest.raises(CheckpointError, match=rf"tensor {name['tensor']} has dtype \w+, expected a floating-point"):
        RingLinearForCausalLM.from_pretrained(path)


def test_a_tensor_stored_in_two_shards_is_named(tmp_path):
    path = _saved(tmp_path)
    first, second = sorted(path.glob("model-*.safetensors"))[:2]
    from safetensors.torch import load_file

    name, tensor = next(iter(load_file(first).items()))
    _rewrite_shard(second, lambda tensors: tensors.update({name: tensor + 1}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is stored in both {first.name} and {second.name}"):
        RingLinearForCausalLM.from_pretrained(path)


def test_an_index_naming_a_tensor_no_shard_holds_or_a_shard_outside_the_folder_is_named(tmp_path):
    path = _saved(tmp_path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = next(iter(index["weight_map"].values()))
    index_file.write_text(json.dumps(index | {"weight_map": index["weight_map"] | {"model.ghost.weight": shard}}))
    with pytest.raises(CheckpointError, match="tensor model.ghost.weight is listed in model.safetensors.index.json"):
        RingLinearForCausalLM.from_pretrained(path)
    (tmp_path / "outside.safetensors").write_bytes((path / shard).read_bytes())
    moved = {name: "../outside.safetensors" if file == shard else file for name, file in index["weight_map"].items()}
    index_file.write_text(json.dumps(index | {"weight_map": moved}))
    with pytest.raises(CheckpointError, match=r"names '\.\./outside\.safetensors' as a shard, which is not a file"):
        RingLinearForCausalLM.from_pretrained(path)


def test_a_failed_swap_without_an_atomic_exchange_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "_exchange", lambda a, b: False)
    path = tmp_path / "ckpt"
    old = _model(0)
    old.save_pretrained(path)
    real_rename, calls = checkpoint_module.os.rename, []

    def rename(source, target):
        calls.append(target)
        if len(calls) == 2:  # the new folder into place: the disk fails
            raise OSError("I/O error")
        real_rename(source, target)

    monkeypatch.setattr(checkpoint_module.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        _model(1).save_pretrained(path)
    monkeypatch.undo()
    assert _same_weights(RingLinearForCausalLM.from_pretrained(path), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_saved_checkpoint_has_the_modes_a_plain_write_gives(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "ckpt"
        _model(0).save_pretrained(path)
        assert path.stat().st_mode & 0o777 == 0o755
        assert all(f.stat().st_mode & 0o777 == 0o644 for f in path.iterdir())
        path.chmod(0o750)
        _model(1).save_pretrained(path)  # a replaced checkpoint keeps its folder's mode
        assert path.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(umask)


def test_a_save_names_the_folders_an_interrupted_save_left(tmp_path, caplog):
    path = tmp_path / "ckpt"
    (tmp_path / ".ckpt.saving-abc123").mkdir()  # what a save killed mid-write leaves (SIGKILL runs no clean-up)
    with caplog.at_level("WARNING"):
        _model(0).save_pretrained(path)
    assert "holds .ckpt.saving-abc123, left by an interrupted save of ckpt" in caplog.text
    assert (tmp_path / ".ckpt.saving-abc123").is_dir()  # another machine may still be writing it: not removed


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_weight_holding_nan_or_infinity_is_named(tmp_path, value):
    path = _saved(tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    name = {}

    def poison(tensors):
        name["tensor"] = next(n for n, t in tensors.items() if t.is_floating_point())
        tensors[name["tensor"]].view(-1)[3] = value

    _rewrite_shard(shard, poison)
    with pytest.raises(CheckpointError, match=rf"tensor {name['tensor']} holds NaN or infinite values"):
        RingLinearForCausalLM.from_pretrained(path)
