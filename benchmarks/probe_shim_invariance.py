"""Whether the aligned shim is itself batch-invariant (issue 15): `token_logprobs(aligned=True)` on 64 mixed
prompts packed in one call against each prompt alone, bit for bit; and, under the engine's batch-invariant
settings, whether a plain `F.linear` (cuBLAS) gives a row the same bits at every row count (the shim runs one
GEMM over all its tokens, the engine at most one step's). Prints what differs; asserts nothing.

python -m benchmarks.probe_shim_invariance runs/tiny/trained --dtype bfloat16
"""

from __future__ import annotations

import argparse


def gemm_rows(dtype, shapes: list[tuple[int, int]], counts: list[int]) -> None:
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)
    for d_in, d_out in shapes:
        x = torch.randn(max(counts), d_in, device="cuda", generator=g).to(dtype)
        w = torch.randn(d_out, d_in, device="cuda", generator=g).to(dtype)
        first = F.linear(x[:1], w)
        unequal = [m for m in counts if not torch.equal(F.linear(x[:m], w)[:1], first)]
        print(f"  F.linear {d_in}->{d_out} {dtype}: row 0 differs from its 1-row bits at row counts {unequal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch

    from benchmarks.probe_aligned import mixed_prompts, packed
    from common_kernels import RingLinearForCausalLM
    from common_kernels.model.engine_invariance import use_engine_invariance

    use_engine_invariance("vllm")
    dtype = getattr(torch, args.dtype)
    shim = RingLinearForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device="cuda").eval()
    c = shim.config
    counts = [1, 2, 16, 64, 128, 192, 256, 300, 512, 1024, 4096, 9152]
    gemm_rows(dtype, [(c.hidden_size, 3 * c.num_attention_heads * c.head_dim), (c.hidden_size, c.vocab_size)], counts)
    gemm_rows(dtype, [(2048, 6144), (2048, 4096)], counts)  # Ring-mini's QKV and g_proj
    prompts = mixed_prompts()
    ids, offsets = packed(prompts)
    with torch.no_grad():
        together = shim.token_logprobs(ids, cu_seqlens=offsets, aligned=True).cpu()
        unequal = 0
        for n, prompt in enumerate(prompts):
            alone = shim.token_logprobs(torch.tensor(prompt, device="cuda"), aligned=True).cpu()
            part = together[offsets[n] : offsets[n + 1]]
            if not torch.equal(alone, part):
                unequal += 1
                if unequal <= 5:
                    first = int((alone != part).nonzero()[0])
                    print(f"  prompt {n} ({len(prompt)} tokens): first difference at {first}")
    print(f"[{args.dtype}] aligned shim: {unequal} of {len(prompts)} prompts differ alone vs packed with the rest")


if __name__ == "__main__":
    main()
