"""What both layer-diff tools share (`sglang_layer_diff`, `vllm_layer_diff`): the shim's per-module outputs for
one prompt, and the comparison of two such dumps by module name."""

from __future__ import annotations

import contextlib
import importlib

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


@contextlib.contextmanager
def record_internals(steps: dict[str, tuple[str, str]], enabled: bool = True):
    """Wrap each `steps` function (label -> (module, name)) so that its first call's tensor arguments and results
    are kept as `step:<label>.in<i>` / `step:<label>.out<i>` (fp32, on the CPU); the functions are put back on
    exit. Yields the dict it fills."""
    recorded: dict[str, torch.Tensor] = {}
    originals = []
    for label, (module_name, function_name) in steps.items() if enabled else ():
        module = importlib.import_module(module_name)
        original = getattr(module, function_name)
        originals.append((module, function_name, original))

        def wrapper(*args, _label=label, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            if f"step:{_label}.out0" not in recorded:
                outputs = result if isinstance(result, tuple) else (result,)
                for kind, values in (("in", args), ("out", outputs)):
                    for i, value in enumerate(values):
                        if isinstance(value, torch.Tensor):
                            recorded[f"step:{_label}.{kind}{i}"] = value.detach().float().cpu()
            return result

        setattr(module, function_name, wrapper)
    try:
        yield recorded
    finally:
        for module, function_name, original in originals:
            setattr(module, function_name, original)


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
