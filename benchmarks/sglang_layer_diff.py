"""Where the SGLang engine and the training shim part ways: one prompt through `sglang.Engine` with SGLang's
tensor dump (`debug_tensor_dump_output_folder`: every leaf module's output, CUDA graphs off), the same prompt
through the shim with forward hooks, and the modules both have compared in forward order. Run on the GPU
machine with SGLang staged (shared/gpu-env) and the plugin's entry point installed (`gpu_checks.sh` writes it):

    python -m benchmarks.sglang_layer_diff CHECKPOINT [--length 8] [--dtype float32]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch


def shim_outputs(
    checkpoint: str, prompt: list[int], dtype: torch.dtype, device: str = "cuda"
) -> dict[str, torch.Tensor]:
    """Every shim module's output for the prompt, by module name (the checkpoint's names)."""
    from common_kernels import RingLinearForCausalLM

    shim = RingLinearForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device)
    outputs: dict[str, torch.Tensor] = {}
    for name, module in shim.named_modules():
        module.register_forward_hook(
            lambda _m, _args, out, name=name: (
                outputs.setdefault(name, out.detach().float().cpu()) if isinstance(out, torch.Tensor) else None
            )
        )
    with torch.no_grad():
        shim(torch.tensor([prompt], device=device))
    return outputs


def engine_outputs(checkpoint: str, prompt: list[int], dtype: str, dump_dir: Path) -> dict[str, torch.Tensor]:
    """SGLang's dump of the prompt's prefill pass (the pass whose input ids are the prompt)."""
    import sglang

    engine = sglang.Engine(
        model_path=checkpoint, dtype=dtype, attention_backend="triton", skip_tokenizer_init=True,
        mem_fraction_static=0.3, disable_radix_cache=True, debug_tensor_dump_output_folder=str(dump_dir),
    )  # fmt: skip
    try:
        engine.generate(input_ids=[prompt], sampling_params={"temperature": 0.0, "max_new_tokens": 1})
    finally:
        engine.shutdown()
    for path in sorted(dump_dir.rglob("Pass*.pt")):
        tensors = torch.load(path)
        ids = next((t for name, t in tensors.items() if name.endswith("forward_batch_info.input_ids")), None)
        if ids is not None and ids.tolist() == prompt:
            return {name: t.float() for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    raise RuntimeError(f"no dumped pass under {dump_dir} holds the prompt's prefill")


def compare(engine: dict[str, torch.Tensor], shim: dict[str, torch.Tensor]) -> list[tuple[str, float, float]]:
    """(name, max abs difference, max abs shim value) for each module both dumped with the same element count,
    in the engine's (forward) order."""
    rows = []
    for name, got in engine.items():
        want = shim.get(name)
        if want is not None and want.numel() == got.numel():
            rows.append((name, (got.reshape(-1) - want.reshape(-1)).abs().max().item(), want.abs().max().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.checkpoint).vocab_size
    prompt = [random.Random(0).randrange(3, vocab) for _ in range(args.length)]
    with tempfile.TemporaryDirectory() as tmp:
        engine = engine_outputs(args.checkpoint, prompt, args.dtype, Path(tmp))
    shim = shim_outputs(args.checkpoint, prompt, getattr(torch, args.dtype))
    print(f"modules dumped: engine {len(engine)}, shim {len(shim)}; compared (engine order):")
    for name, diff, scale in compare(engine, shim):
        print(f"{diff:10.3e} (of {scale:9.3e})  {name}")
    print("engine only:", sorted(set(engine) - set(shim)))


if __name__ == "__main__":
    main()
