"""Default mode's gap between the engine and the shim (issue 15, item 2): 64 mixed-length requests served by vLLM
as a user serves them (chunked prefill, torch.compile, CUDA graphs), then the shim's `token_logprobs` on each
prompt + its generated tokens. Prints mean / p99 / max |engine - shim| over every prompt and sampled-token logprob,
and the share of tokens whose selected experts differ in any MoE layer (vLLM's `enable_return_routed_experts`
against the shim's own routing), per dtype.

python -m benchmarks.default_gap runs/tiny/trained --dtype float32 bfloat16
"""

from __future__ import annotations

import argparse
import os

import torch


def gap_stats(mine: torch.Tensor, engine: torch.Tensor) -> dict[str, float]:
    """|mine - engine| over matching logprobs: mean, p99, max, and how many differ in any bit."""
    gap = (mine.double() - engine.double()).abs()
    return {
        "tokens": gap.numel(),
        "unequal": int((gap > 0).sum()),
        "mean": float(gap.mean()),
        "p99": float(gap.quantile(0.99)),
        "max": float(gap.max()),
    }


def expert_mismatch(engine_ids: torch.Tensor, shim_ids: torch.Tensor) -> float:
    """The share of tokens (rows of `[T, layers, k]`) whose expert set differs from the shim's in any layer."""
    engine_sets, shim_sets = engine_ids.sort(dim=-1).values, shim_ids.sort(dim=-1).values
    return float((engine_sets != shim_sets).any(dim=-1).any(dim=-1).float().mean())


def shim_routing(shim, ids: torch.Tensor, offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The shim's default-mode logprobs of the packed sequences and its chosen experts `[T, MoE layers, k]`."""
    from common_kernels.model.layers import MoE

    chosen: list[torch.Tensor] = []
    real = MoE.route

    def recording(self, x, aligned=False):
        expert_ids, weights = real(self, x, aligned)
        chosen.append(expert_ids)
        return expert_ids, weights

    MoE.route = recording
    try:
        with torch.no_grad():
            logprobs = shim.token_logprobs(ids, cu_seqlens=offsets)
    finally:
        MoE.route = real
    return logprobs.cpu(), torch.stack(chosen, dim=1).cpu()


def measure(checkpoint: str, dtype: str) -> str:
    from vllm import LLM, SamplingParams, TokensPrompt

    from benchmarks.probe_aligned import mixed_prompts, packed
    from common_kernels import RingLinearForCausalLM

    prompts = mixed_prompts()
    llm = LLM(
        model=checkpoint, dtype=dtype, max_model_len=512, max_num_seqs=64, max_num_batched_tokens=256,
        gpu_memory_utilization=0.25, seed=0, skip_tokenizer_init=True, enable_return_routed_experts=True,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    del llm
    torch.cuda.empty_cache()

    shim = RingLinearForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), device="cuda").eval()
    ids, offsets = packed([p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outputs, strict=True)])
    mine, shim_ids = shim_routing(shim, ids, offsets)
    engine_lp, mine_lp, mismatched, routed_tokens = [], [], [], 0
    moe_layers = [i for i in range(shim.config.num_hidden_layers) if shim.config.is_moe_layer(i)]
    for n, o in enumerate(outputs):
        a, b = offsets[n], offsets[n + 1]
        engine_lp += [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]
        engine_lp += [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]
        mine_lp.append(mine[a + 1 : b])
        routed = o.outputs[0].routed_experts
        if routed is not None:
            routed = torch.as_tensor(routed).long()  # uint8 / uint16 as vLLM returns it
            if routed.shape[1] != len(moe_layers):  # one row per layer: keep the MoE layers
                routed = routed[:, moe_layers]
            T = min(routed.shape[0], b - a)
            mismatched.append(expert_mismatch(routed[:T], shim_ids[a : a + T].long()) * T)
            routed_tokens += T
    stats = gap_stats(torch.cat(mine_lp), torch.tensor(engine_lp))
    experts = f"{sum(mismatched) / routed_tokens:.2%}" if routed_tokens else "not returned"
    return (
        f"[{dtype}] default mode, shim vs engine over {stats['tokens']} logprobs: unequal {stats['unequal']}, mean "
        f"{stats['mean']:.2e}, p99 {stats['p99']:.2e}, max {stats['max']:.2e}; tokens routed to other experts in "
        f"any MoE layer: {experts}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    for dtype in args.dtype:
        print(measure(args.checkpoint, dtype), flush=True)


if __name__ == "__main__":
    main()
