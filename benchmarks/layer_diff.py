"""What both layer-diff tools share (`sglang_layer_diff`, `vllm_layer_diff`): the shim's per-module outputs for
one prompt, and the comparison of two such dumps by module name."""

from __future__ import annotations

import torch


def shim_outputs(
    shim: torch.nn.Module, prompt: list[int], device: str = "cuda", aligned: bool = False
) -> dict[str, torch.Tensor]:
    """Every shim module's output for the prompt, by module name (the checkpoint's names); `aligned`: through
    `token_logprobs(aligned=True)`, as an aligned engine prefills the prompt."""
    outputs: dict[str, torch.Tensor] = {}

    def record(name: str, out) -> None:  # returns None: a hook's return value would replace the module's output
        if isinstance(out, torch.Tensor):
            outputs.setdefault(name, out.detach().float().cpu())

    hooks = [
        module.register_forward_hook(lambda _m, _args, out, name=name: record(name, out))
        for name, module in shim.named_modules()
    ]
    try:
        with torch.no_grad():
            ids = torch.tensor([prompt], device=device)
            if aligned:
                shim.token_logprobs(ids[0], cu_seqlens=[0, len(prompt)], aligned=True)
            else:
                shim(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def compare(engine: dict[str, torch.Tensor], shim: dict[str, torch.Tensor]) -> list[tuple[str, float, float]]:
    """(name, max abs difference, max abs shim value) for each module both dumped with the same element count,
    in the engine's (forward) order."""
    rows = []
    for name, got in engine.items():
        want = shim.get(name)
        if isinstance(got, list):
            continue
        if want is not None and want.numel() == got.numel():
            rows.append((name, (got.reshape(-1) - want.reshape(-1)).abs().max().item(), want.abs().max().item()))
    return rows
