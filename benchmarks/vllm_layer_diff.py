"""Where the vLLM engine and the training shim part ways, module by module: one prompt through an in-process
`vllm.LLM` (eager, so forward hooks see every module) and the same prompt through the shim, each module's output
compared by name, bit for bit. With `--aligned` both run aligned mode (`RING_LINEAR_ALIGNED=1`, the shim's
`token_logprobs(aligned=True)`): the first module that is not `equal` is where aligned mode's bitwise claim breaks.
Run on the GPU machine with vLLM staged and the plugin's entry point installed (`gpu_checks.sh vllm-diff`):

    python -m benchmarks.vllm_layer_diff CHECKPOINT [--length 8] [--dtype float32] [--aligned] [--internals] [--split N]

`--internals` also compares, inside the first linear-attention layer, what its steps hand each other (q, k, v,
the attention output, the gate, the input of `dense`): a module's output names the layer, these name the step.
`--split N` prefills the prompt in chunks of N tokens (a token budget of N) and compares every chunk's rows: where a
continued prefill parts from the shim. `--beside F` (with `--split`) sends an F-token prompt first, which fills the
first step's budget before the prompt's first chunk and decodes beside its second (as in a served batch).
"""

from __future__ import annotations

import argparse
import os
import random

import torch

from benchmarks.layer_diff import compare, record_internals, shim_outputs

# where each side calls the linear layer's steps (module, function name), for `--internals`; the aligned
# attention is recorded under one name on both sides (the engine writes its `out`, the shim returns it)
SHIM_STEPS = {
    "prepare_qkv": ("common_kernels.model.layers", "prepare_qkv"),
    "attention": ("common_kernels.model.layers", "linear_attention_as_served"),
    "gate_output": ("common_kernels.model.layers", "gate_output"),
}
ENGINE_STEPS = {
    "prepare_qkv": ("ring_linear_vllm.linear_attention", "prepare_qkv"),
    "attention": ("common_kernels.serving.step", "linear_attention_windowed"),
    "gate_output": ("ring_linear_vllm.linear_attention", "gate_output"),
}
ENGINE_OUTPUTS: dict[str, list[torch.Tensor]] = {}  # filled by the hooks, in this process (the engine runs in it)


def record_forwards(model: torch.nn.Module) -> int:
    """Hook every module of the engine's model to keep each output from now on (a tuple's first tensor), one per
    forward; returns how many modules were hooked."""

    def record(name: str, out) -> None:
        out = out[0] if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) else out
        if isinstance(out, torch.Tensor):
            ENGINE_OUTPUTS.setdefault(name, []).append(out.detach().float().cpu())

    modules = list(model.named_modules())
    for name, module in modules:
        module.register_forward_hook(lambda _m, _args, out, name=name: record(name, out))
    return len(modules)


def engine_outputs(
    checkpoint: str, prompt: list[int], dtype: str, internals: bool, split: int | None = None, beside: int = 0
) -> dict[str, torch.Tensor]:
    """The engine's module outputs for the prompt's prefill, its chunks' rows joined when `split` cuts it into
    prefill steps of that many tokens (and, with `internals`, its first linear layer's steps, recorded from after
    start-up, whose warm-up runs the same functions)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its hooks write here
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # `apply_model` hands vLLM a function
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=checkpoint, dtype=dtype, max_model_len=max(512, 2 * len(prompt)), gpu_memory_utilization=0.25, seed=0,
        skip_tokenizer_init=True, enforce_eager=True, enable_chunked_prefill=split is not None,
        enable_prefix_caching=False,
        **({} if split is None else {"max_num_batched_tokens": split, "max_num_seqs": min(split, 64)}),
    )  # fmt: skip
    llm.apply_model(record_forwards)
    requests = [TokensPrompt(prompt_token_ids=prompt)]
    params = [SamplingParams(temperature=0.0, max_tokens=1)]
    if beside:  # decodes first in a step: the filler's decode row, then the prompt's second chunk
        filler = [random.Random(1).randrange(3, 64) for _ in range(beside)]
        requests.insert(0, TokensPrompt(prompt_token_ids=filler))
        params.insert(0, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        rows = [(beside, split), (1, 1 + len(prompt) - (split - beside))]
    else:
        n = 1 if split is None else -(-len(prompt) // split)
        rows = [(0, None)] * n
    with record_internals(ENGINE_STEPS, enabled=internals) as steps:
        llm.generate(requests, params)
    joined = {}
    for name, outs in ENGINE_OUTPUTS.items():
        chunks = [out[a:b] for out, (a, b) in zip(outs, rows, strict=False)]
        if len(chunks) == len(rows) and len({c.shape[1:] for c in chunks}) == 1:
            joined[name] = torch.cat(chunks)
    return {**steps, **joined}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--aligned", action="store_true", help="both sides in aligned mode")
    parser.add_argument("--internals", action="store_true", help="the first linear layer's steps too")
    parser.add_argument("--split", type=int, default=None, help="prefill in chunks of this many tokens")
    parser.add_argument("--beside", type=int, default=0, help="a prompt of this many tokens sent first (with --split)")
    args = parser.parse_args()
    if args.beside and not (
        args.split and args.beside < args.split and args.length - (args.split - args.beside) < args.split
    ):
        parser.error("--beside F needs --split N > F, and the prompt's rest after the first step to fit the second")
    if args.internals and not args.aligned:  # the steps it records are aligned mode's
        parser.error("--internals compares aligned mode's steps: add --aligned")
    if args.aligned:
        os.environ.update({"RING_LINEAR_ALIGNED": "1", "VLLM_BATCH_INVARIANT": "1"})
    from common_kernels import RingLinearForCausalLM

    # the shim first: the engine's start-up must not change what the reference computes
    model = RingLinearForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype), device="cuda")
    prompt = [random.Random(0).randrange(3, model.config.vocab_size) for _ in range(args.length)]
    with record_internals(SHIM_STEPS, enabled=args.internals) as shim_steps:
        shim = shim_outputs(model, prompt, aligned=args.aligned)
    shim.update(shim_steps)
    engine = engine_outputs(args.checkpoint, prompt, args.dtype, args.internals, args.split, args.beside)
    print(f"modules: engine {len(engine)}, shim {len(shim)}; compared in the engine's forward order:")
    for name, diff, scale in compare(engine, shim):
        print(f"{'equal' if diff == 0 else f'{diff:.3e}':>10} (of {scale:9.3e})  {name}")
    print("engine only:", sorted(set(engine) - set(shim)))


if __name__ == "__main__":
    main()
