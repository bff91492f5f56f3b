"""The checkpoint-loading loop an engine runs, with the engine's own way of putting one tensor in place."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

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
