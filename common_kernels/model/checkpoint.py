"""HF checkpoint I/O: the tensor-name table, strict checks, streaming load and sharded, atomic save.

The layout is the released one: `config.json`, `model-0000i-of-0000n.safetensors` shards and
`model.safetensors.index.json` (a single `model.safetensors` loads too). Module names of the shim equal
the checkpoint names, so the name table below is the whole mapping; engine adapters reuse it and add
only their own fused-parameter shard ids.

A checkpoint folder is written whole into a temporary folder beside it, flushed to disk, then swapped into
place (`atomic_directory`), so an interrupted save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.utils import CONFIG_NAME, logging

from ..config import RingLinearConfig, RingLinearConfigError
from ..errors import RingLinearError

logger = logging.get_logger(__name__)
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TRAINING_STATE = "training_state.pt"  # a trainer's optimizer, schedule and step, saved with the weights
SHARD_PATTERN = "model{suffix}.safetensors"

# Tensors some exporters write that carry nothing the model needs: the decay is recomputed from the
# config (`slope`) and so are the rotary tables (`inv_freq`).
_DERIVED_TENSORS = re.compile(r"(^|\.)(slope|rotary_emb\.inv_freq)$")


class CheckpointError(RingLinearError):
    """A checkpoint folder that cannot be read as this model: a missing or unreadable file, or tensors that do not
    match the config (all named)."""


def read_config(path: str | os.PathLike) -> RingLinearConfig:
    """The config of a checkpoint folder; a missing folder or `config.json`, bad JSON, another model type or a
    missing shape field is an error naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(
            f"{path}: no {CONFIG_NAME}; a Ring-linear checkpoint folder holds {CONFIG_NAME} beside its safetensors "
            "shards (without it no shape is known)"
        )
    try:
        config_dict = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from None
    try:
        return RingLinearConfig.from_dict(config_dict)
    except RingLinearConfigError as error:  # the file named, as transformers' own loading path cannot
        raise RingLinearConfigError(f"{file}: {error}") from None


def expected_tensor_shapes(config: RingLinearConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Ring-linear checkpoint and its shape, in file order."""
    H, Hkv, d, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (config.vocab_size, D)}
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        if config.is_softmax_layer(l):
            shapes[p + "attention.query_key_value.weight"] = ((H + 2 * Hkv) * d, D)
        else:
            shapes[p + "attention.query_key_value.weight"] = (3 * H * d, D)
            shapes[p + "attention.g_proj.weight"] = (H * d, D)
            shapes[p + "attention.g_norm.weight"] = (H * d,)
        if config.use_qk_norm:
            shapes[p + "attention.query_layernorm.weight"] = (d,)
            shapes[p + "attention.key_layernorm.weight"] = (d,)
        shapes[p + "attention.dense.weight"] = (D, H * d)
        if config.is_moe_layer(l):
            shapes[p + "mlp.gate.weight"] = (config.num_experts, D)
            if config.moe_router_enable_expert_bias:
                shapes[p + "mlp.gate.expert_bias"] = (config.num_experts,)
            for e in range(config.num_experts):
                shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", D, config.moe_intermediate_size))
            if config.num_shared_experts > 0:
                width = config.moe_shared_expert_intermediate_size * config.num_shared_experts
                shapes.update(_mlp_shapes(p + "mlp.shared_experts.", D, width))
        else:
            shapes.update(_mlp_shapes(p + "mlp.", D, config.intermediate_size))
    shapes["model.norm.weight"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, D)
    return shapes


def _mlp_shapes(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (width, hidden),
        prefix + "up_proj.weight": (width, hidden),
        prefix + "down_proj.weight": (hidden, width),
    }


def is_ignored_tensor(name: str, config: RingLinearConfig) -> bool:
    """Tensors a checkpoint may hold that the model does not use: derived tables and MTP layers."""
    if _DERIVED_TENSORS.search(name):
        return True
    match = re.match(r"model\.layers\.(\d+)\.", name)
    mtp_layers = range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers)
    return bool(match) and int(match.group(1)) in mtp_layers


def _weight_map(path: Path) -> dict[str, str] | None:
    """A checkpoint index's tensor name -> shard file name (None without an index)."""
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise TypeError("a file name that is not a string")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{index}: not a safetensors index ({type(error).__name__}: {error}); it needs a "
            '"weight_map" of tensor name -> file name: copy or save the checkpoint again'
        ) from None
    return weight_map


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when there is one."""
    path = Path(path)
    weight_map = _weight_map(path)
    if weight_map is not None:
        index = path / SAFE_WEIGHTS_INDEX_NAME
        names = list(dict.fromkeys(weight_map.values()))
        outside = [name for name in names if Path(name).name != name or name in ("", ".", "..")]
        if outside:
            raise CheckpointError(
                f"{index}: names {outside[0]!r} as a shard, which is not a file of this folder; a checkpoint's "
                "shards sit beside its index: copy or save the checkpoint again"
            )
        return [path / name for name in names]
    single = path / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: neither {SAFE_WEIGHTS_INDEX_NAME} nor {SAFE_WEIGHTS_NAME} found")


@contextmanager
def _open_shard(file: Path) -> Iterator:
    """`safe_open` with the file named when it is missing, truncated or corrupt."""
    if not file.is_file():
        raise CheckpointError(f"{file}: listed in {SAFE_WEIGHTS_INDEX_NAME} but missing")
    if not os.access(file, os.R_OK):
        raise CheckpointError(f"{file}: not readable (permission denied)")
    try:
        with safe_open(file, framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{file}: unreadable safetensors file ({error}); it is truncated or corrupt: copy or save it again"
        ) from None


@dataclass(frozen=True)
class TensorHeader:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, I32, BOOL, ...
    file: Path


def read_tensor_headers(path: str | os.PathLike) -> dict[str, TensorHeader]:
    """Name -> shape, dtype and file of every tensor in a checkpoint, from the file headers only (no data); a
    tensor stored in two shards is refused (which copy would load depends on the order they are read in)."""
    headers: dict[str, TensorHeader] = {}
    for file in checkpoint_files(path):
        with _open_shard(file) as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name in headers:
                    raise CheckpointError(
                        f"{path}: tensor {name} is stored in both {headers[name].file.name} and {file.name}; keep "
                        "one copy (save the checkpoint again)"
                    )
                piece = fh.get_slice(name)
                headers[name] = TensorHeader(tuple(piece.get_shape()), piece.get_dtype(), file)
    return headers


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint, read from the file headers only (no data)."""
    return {name: header.shape for name, header in read_tensor_headers(path).items()}


def check_checkpoint(config: RingLinearConfig, path: str | os.PathLike, report_all_errors: bool = True) -> None:
    """Raise `CheckpointError` unless the checkpoint holds exactly the tensors `config` needs.

    With `report_all_errors` every problem is listed (missing, unexpected, misshapen); otherwise the first.
    """
    expected = expected_tensor_shapes(config)
    headers = read_tensor_headers(path)
    found = {name: header.shape for name, header in headers.items()}
    problems = [
        f"missing tensor {name} (expected shape {list(shape)})" for name, shape in expected.items() if name not in found
    ]
    problems += [
        f"unexpected tensor {name} (shape {list(shape)}): not part of this config"
        for name, shape in found.items()
        if name not in expected and not is_ignored_tensor(name, config)
    ]
    problems += [
        f"tensor {name} has shape {list(found[name])}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    ]
    problems += [  # an integer or boolean tensor would be cast into a weight (an int32 one as zeros, say)
        f"tensor {name} has dtype {headers[name].dtype}, expected a floating-point one"
        for name in expected
        if name in headers and not headers[name].dtype.startswith(("F", "BF"))
    ]
    problems += [
        f"tensor {name} is listed in {SAFE_WEIGHTS_INDEX_NAME} but stored in no shard"
        for name in _weight_map(Path(path)) or {}
        if name not in found
    ]
    if problems:
        shown = problems if report_all_errors else problems[:1]
        more = (
            ""
            if report_all_errors or len(problems) == 1
            else f"\n  ... and {len(problems) - 1} more (pass report_all_errors=True)"
        )
        raise CheckpointError(f"checkpoint {path} does not match its config:\n  " + "\n  ".join(shown) + more)


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by checkpoint name (the router bias is a buffer)."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


@torch.no_grad()
def load_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy a checked checkpoint into `module`'s tensors, one shard and one tensor at a time.

    Each tensor is converted to the dtype of its destination (the fp32 router bias stays fp32). A tensor holding
    NaN or infinity is refused by name: every logit would be NaN, and generation would silently emit token 0.
    """
    targets = _named_tensors(module)
    for file in checkpoint_files(path):
        with _open_shard(file) as fh:
            for name in fh.keys():  # noqa: SIM118
                if name in targets:
                    targets[name].copy_(fh.get_tensor(name))
                    if not torch.isfinite(targets[name]).all():
                        raise CheckpointError(
                            f"{file}: tensor {name} holds NaN or infinite values (a diverged training step?); "
                            "load an earlier checkpoint"
                        )


def save_weights(
    module: torch.nn.Module, config: RingLinearConfig, path: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> None:
    """Write `module`'s checkpoint tensors as safetensors shards plus an index (or one file if it fits) into
    `path`, replacing the shards there (not atomic by itself: `atomic_directory` makes a whole save atomic)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    wanted = expected_tensor_shapes(config)
    tensors = _named_tensors(module)
    state = {name: tensors[name].detach().contiguous() for name in wanted}
    split = split_torch_state_dict_into_shards(state, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    for stale in list(path.glob("model*.safetensors")) + [path / SAFE_WEIGHTS_INDEX_NAME]:
        stale.unlink(missing_ok=True)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, path / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# Files a save writes; anything else already in the target folder (a README, a tokenizer, notes) is carried
# over into the new folder, so replacing a checkpoint never drops a user's own files.
_WRITTEN = re.compile(
    r"^(model.*\.safetensors|"
    + "|".join(re.escape(name) for name in (SAFE_WEIGHTS_INDEX_NAME, CONFIG_NAME, TRAINING_STATE))
    + ")$"
)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside `path` to write a checkpoint into; when the block finishes, its files are
    flushed to disk and the folder takes `path`'s place in one rename. Files of the old folder that the save did
    not write (a README, notes) are carried over as hard links, so nothing is copied and nothing dropped; a
    target holding subfolders is refused, as no checkpoint does. If the block raises, `path` is left untouched
    and the temporary folder removed."""
    path = Path(path)
    if path.is_symlink():  # write where the link points; swapping would replace the link itself
        path = path.resolve()
    keep = _files_to_keep(path)
    staging = _make_staging(path)
    _name_leftovers(path, staging)
    try:
        yield staging
        for old in keep:
            if not (staging / old.name).exists():
                _link_or_copy(old, staging / old.name)
        _set_modes(staging, path)
        _fsync_tree(staging)
        _swap_into_place(staging, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap it holds the previous checkpoint


def _files_to_keep(path: Path) -> list[Path]:
    """The files of an existing target a save does not write; refuses a target that is not a folder of files."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a folder; choose another output path")
    if not path.is_dir():
        return []
    entries = list(path.iterdir())
    folders = [entry.name for entry in entries if entry.is_dir()]
    if folders:
        raise CheckpointError(
            f"{path}: holds folders ({', '.join(sorted(folders)[:3])}), so it is not a checkpoint folder; nothing was "
            "written: save into a new or empty folder"
        )
    return [entry for entry in entries if not _WRITTEN.match(entry.name)]


def _name_leftovers(path: Path, staging: Path) -> None:
    """Say where an earlier save was killed mid-write (its temporary folder stays: a process on another machine
    may still be writing one, so none is removed here)."""
    leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}.saving-*") if p != staging)
    if leftovers:
        logger.warning(
            "ring-linear: %s holds %s, left by an interrupted save of %s; delete them once no other save is running",
            path.parent,
            ", ".join(leftovers),
            path.name,
        )


def check_writable(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` now if a checkpoint could not be saved at `path` (before hours of work)."""
    path = Path(path)
    _files_to_keep(path)
    shutil.rmtree(_make_staging(path))


def _make_staging(path: Path) -> Path:
    """The temporary folder beside `path` (same file system, so the final rename is atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    except FileExistsError:
        raise CheckpointError(f"{path}: a file stands where a folder of this path should be") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot write beside it ({error.strerror})") from None


def _set_modes(staging: Path, path: Path) -> None:
    """The modes a plain write would give (the temporary folder is private, 0700): the folder keeps the previous
    checkpoint's mode, else the umask's; the files the save wrote get the umask's (carried-over files keep theirs)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, path.stat().st_mode & 0o7777 if path.is_dir() else 0o777 & ~umask)
    for file in staging.iterdir():
        if _WRITTEN.match(file.name):
            os.chmod(file, 0o666 & ~umask)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder, name))
        _fsync(Path(folder))


def _swap_into_place(staging: Path, path: Path) -> None:
    """`path` becomes `staging`'s content; `staging` ends up holding the previous content (or nothing)."""
    if not path.exists():
        os.rename(staging, path)
        return
    if _exchange(staging, path):
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.previous-", dir=path.parent))
    os.rename(path, backup / path.name)  # no atomic exchange here: the previous folder waits in `backup`
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(backup / path.name, path)  # the previous checkpoint back in its place
        backup.rmdir()
        raise
    os.rename(backup / path.name, staging)
    backup.rmdir()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
