"""The checkpoint-loading loop an engine runs, with the engine's own way of putting one tensor in place."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..config import RingLinearConfig
from ..model.checkpoint import CheckpointError, expected_tensor_shapes, is_ignored_tensor


def load_checkpoint_tensors(
    weights: Iterable[tuple[str, torch.Tensor]],
    config: RingLinearConfig,
    load_tensor: Callable[[str, torch.Tensor], str],
    skip: Callable[[str], bool] = lambda name: False,
    load_extra: Callable[[str, torch.Tensor], str | None] = lambda name, tensor: None,
) -> set[str]:
    """Check each HF-named tensor against the config and hand it to `load_tensor` (which returns the engine
    parameter it filled); returns those parameters. Any subset may come, so RL weight sync can call it again.

    `skip` drops names this rank does not hold (pipeline stages); `load_extra` may take a name the format does
    not have (a pre-quantized checkpoint's scales) and return its parameter, or None. Anything else the format
    does not have, or a tensor of the wrong shape, raises `CheckpointError` naming it."""
    expected = expected_tensor_shapes(config)
    loaded: set[str] = set()
    for name, tensor in weights:
        if is_ignored_tensor(name, config) or skip(name):
            continue
        if name not in expected:
            extra = load_extra(name, tensor)
            if extra is None:
                raise CheckpointError(
                    f"unexpected tensor {name!r} {tuple(tensor.shape)}: Ring-linear-2.0 with this config has no such "
                    f"weight (check num_hidden_layers, num_experts, tie_word_embeddings, or the checkpoint)"
                )
            loaded.add(extra)
            continue
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {expected[name]}"
            )
        loaded.add(load_tensor(name, tensor))
    return loaded


# checkpoint sub-name -> (the engines' fused gate/up parameter, its shard id); experts use the engine's mapping
STACKED_PARAMS = {".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}


def place_tensor(
    params: dict[str, nn.Parameter],
    experts: Sequence[tuple[str, str, int, str]],
    name: str,
    tensor: torch.Tensor,
    default_loader: Callable[[nn.Parameter, torch.Tensor], None],
) -> str:
    """Put one checked HF tensor into an engine's parameters, as vLLM and SGLang both lay them out: an expert's
    weight into the fused-MoE parameter that `experts` (the engine's `(param, weight, expert_id, shard_id)`
    mapping) names, `gate_proj`/`up_proj` into the fused `gate_up_proj` shard, anything else by its parameter's
    own loader (`default_loader` where it has none). Returns the parameter filled."""
    if ".mlp.experts." in name:
        for param_name, weight_name, expert_id, shard_id in experts:
            if weight_name in name:
                target = name.replace(weight_name, param_name)
                params[target].weight_loader(params[target], tensor, target, shard_id=shard_id, expert_id=expert_id)
                return target
        raise CheckpointError(f"no fused-MoE parameter for expert tensor {name!r}")
    for ckpt_part, (param_part, shard_id) in STACKED_PARAMS.items():
        if ckpt_part in name:
            target = name.replace(ckpt_part, param_part)
            params[target].weight_loader(params[target], tensor, shard_id)
            return target
    getattr(params[name], "weight_loader", default_loader)(params[name], tensor)
    return name
