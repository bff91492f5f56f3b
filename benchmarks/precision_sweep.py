"""How far each product setting of the linear layers moves logprobs from float64 (issue 15, "the TF32 default,
decided with numbers"): the shim on a GPU, the trained tiny checkpoint, prompts of 1K-32K tokens, each setting
against a float64 copy of the same model (PyTorch references, no Triton).

Settings: fp32 q/k/v with `tf32`, `tf32x3` and `ieee` products (`RING_LINEAR_FP32_DOT`, read at each launch),
and bf16 q/k/v (bf16 tensor-core products; a probe, not a supported setting). Their speed is in RESULTS.md
(eager 16K prefill, per linear layer: tf32 0.43 ms, tf32x3 1.5 ms, ieee 58 ms, bf16 below 0.36 ms).

python -m benchmarks.precision_sweep runs/tiny/trained --lengths 1024 4096 16384
(32768 works where the float64 reference's full attention scores fit: about 100 GB for the tiny model)
"""

from __future__ import annotations

import argparse

import torch

from common_kernels import RingLinearForCausalLM
from common_kernels.model import linear_math
from common_kernels.ops import triton_settings

SETTINGS = ("tf32", "tf32x3", "ieee", "bf16-qkv")


def logprob_gap(reference: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute difference of two logprob vectors."""
    gap = (got.double() - reference.double()).abs()
    return gap.max().item(), gap.mean().item()


def run_setting(model: RingLinearForCausalLM, ids: torch.Tensor, setting: str) -> torch.Tensor:
    """The model's token logprobs of `ids` under one product setting (restored afterwards)."""
    saved = triton_settings.FP32_DOT_PRECISION, linear_math.LINEAR_ATTN_DTYPE
    try:
        if setting == "bf16-qkv":
            linear_math.LINEAR_ATTN_DTYPE = torch.bfloat16
        else:
            triton_settings.FP32_DOT_PRECISION = setting
        with torch.no_grad():
            return model.token_logprobs(ids)
    finally:
        triton_settings.FP32_DOT_PRECISION, linear_math.LINEAR_ATTN_DTYPE = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    args = parser.parse_args()
    model = RingLinearForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32, device="cuda", use_triton=True)
    exact = RingLinearForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float64, device="cuda", use_triton=False)
    for m in (model, exact):  # arithmetic, not the model's quality, is measured: lengths past its context are fine
        m.config.max_position_embeddings = max(m.config.max_position_embeddings, max(args.lengths))
    generator = torch.Generator().manual_seed(0)
    print("| tokens | setting | max abs logprob diff vs float64 | mean |")
    print("|---:|---|---:|---:|")
    for length in args.lengths:
        ids = torch.randint(3, model.config.vocab_size, (length,), generator=generator).cuda()
        with torch.no_grad():
            reference = exact.token_logprobs(ids)
        for setting in SETTINGS:
            worst, mean = logprob_gap(reference, run_setting(model, ids, setting))
            print(f"| {length:,} | {setting} | {worst:.2e} | {mean:.2e} |", flush=True)


if __name__ == "__main__":
    main()
