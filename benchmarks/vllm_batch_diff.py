"""Where one request of a served batch parts from the shim, module by module: `probe_aligned`'s 64 mixed prompts
through an in-process eager `vllm.LLM` with chunked prefill (the aligned GPU test's batch), every forward's module
outputs and input rows recorded; the rows of request `--request` found in each step by their positions and token
ids, joined over its prefill chunks and compared with the shim's outputs for its prompt, bit for bit. It prints the
rows each step gave the request (a chunk that stops short, or a token id that is not the prompt's, shows there)
and, per module, the first prompt position that differs.

    python -m benchmarks.vllm_batch_diff CHECKPOINT --request 10 [--dtype bfloat16] [--budget 1024] [--caching]
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.layer_diff import shim_outputs
from benchmarks.probe_aligned import mixed_prompts

STEPS: list[dict] = []  # per forward: "ids", "positions" and each module's output (the engine runs in this process)


def record_steps(model: torch.nn.Module) -> int:
    """Hook the engine's model: each forward's input ids and positions, and every module's output."""

    def inputs(_module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        STEPS.append({"ids": ids.detach().cpu(), "positions": positions.detach().cpu()})

    def output(name: str, out) -> None:
        out = out[0] if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) else out
        if isinstance(out, torch.Tensor) and STEPS:
            STEPS[-1].setdefault(name, out.detach().float().cpu())

    model.register_forward_pre_hook(inputs, with_kwargs=True)
    for name, module in model.named_modules():
        module.register_forward_hook(lambda _m, _args, out, name=name: output(name, out))
    return len(STEPS)


def rows_of(prompt: list[int], ids: torch.Tensor, positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first row, first position, length) of each run of rows that carries the prompt's tokens at their positions
    (three rows at least, or a run that starts the prompt), in one step's input."""
    runs, row, n = [], 0, ids.shape[0]
    while row < n:
        p = int(positions[row])
        if p < len(prompt) and int(ids[row]) == prompt[p]:
            end = row
            while end + 1 < n and int(positions[end + 1]) == p + end + 1 - row and p + end + 1 - row < len(prompt) \
                    and int(ids[end + 1]) == prompt[p + end + 1 - row]:  # fmt: skip
                end += 1
            if end - row + 1 >= 3 or p == 0:
                runs.append((row, p, end - row + 1))
            row = end + 1
        else:
            row += 1
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--request", type=int, required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--caching", action="store_true", help="prefix caching on (vLLM's mamba align mode)")
    args = parser.parse_args()
    os.environ.update({"RING_LINEAR_ALIGNED": "1", "VLLM_BATCH_INVARIANT": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams, TokensPrompt

    from common_kernels import RingLinearForCausalLM

    prompts = mixed_prompts()
    prompt = prompts[args.request]
    shim = RingLinearForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype), device="cuda")
    want = shim_outputs(shim, prompt, aligned=True)
    del shim
    llm = LLM(
        model=args.checkpoint, dtype=args.dtype, max_model_len=512, max_num_seqs=64, gpu_memory_utilization=0.25,
        seed=0, skip_tokenizer_init=True, enforce_eager=True, enable_chunked_prefill=True,
        enable_prefix_caching=args.caching, max_num_batched_tokens=args.budget,
    )  # fmt: skip
    llm.apply_model(record_steps)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    got: dict[str, torch.Tensor] = {}
    for index, step in enumerate(STEPS):
        runs = rows_of(prompt, step["ids"], step["positions"])
        if runs:
            print(
                f"step {index}: {step['ids'].shape[0]} rows; request {args.request}'s (row, position, length): {runs}"
            )
        for row, position, length in runs:
            for name, out in step.items():
                if name in ("ids", "positions") or name not in want or out.shape[0] != step["ids"].shape[0]:
                    continue
                into = got.setdefault(name, torch.full((len(prompt), *out.shape[1:]), float("nan")))
                into[position : position + length] = out[row : row + length]
    print(f"request {args.request}: {len(prompt)} prompt tokens; per module, the first position that differs:")
    for name, rows in got.items():
        if want[name].numel() != rows.numel():  # not one row per token on the shim's side (a layout of its own)
            continue
        expected = want[name].reshape(rows.shape)
        unequal = (rows != expected).flatten(1).any(1).nonzero().flatten().tolist()
        first = unequal[0] if unequal else None
        gap = (rows - expected).abs().nan_to_num(0).max().item()
        print(f"{'equal' if first is None else f'from {first}':>10} (max {gap:.3e})  {name}")


if __name__ == "__main__":
    main()
