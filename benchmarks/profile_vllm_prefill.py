"""Where a vLLM prefill or decode step spends GPU time: torch.profiler, dummy weights at the Ring-mini sizes.
Usage:

python -m benchmarks.profile_vllm_prefill --variant ring-linear --length 16384
RING_LINEAR_FP32_DOT=tf32x3 python -m benchmarks.profile_vllm_prefill    # other fp32 products
python -m benchmarks.profile_vllm_prefill --linear-qkv-dtype bfloat16     # bf16 q/k/v into the kernels
python -m benchmarks.profile_vllm_prefill --compiled --decode-batch 64 --length 4096   # one decode step
python -m benchmarks.profile_vllm_prefill --compiled --length 4096 --prompts 2   # a served chat step's 8K prefill

The decode mode profiles the same prompts twice, for 1 and for 1 + `--decode-steps` new tokens, and prints each
kernel's time per decode step: the difference of the two profiles divided by the step count (the prefill cancels).
"""

from __future__ import annotations

import argparse
import os
import random
import time

from benchmarks.bench_vllm_e2e import VARIANTS, dummy_llm, random_prompts, use_vllm_linear_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="ring-linear")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--prompts", type=int, default=1, help="prefill this many prompts in one batch")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--linear-qkv-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compiled", action="store_true", help="torch.compile and CUDA graphs, as served")
    parser.add_argument("--decode-batch", type=int, default=0, help="profile decode steps of this many sequences")
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: the probe's patch applies
    import torch
    from vllm import SamplingParams

    if args.variant == "ring-linear-vllm-kernels":
        use_vllm_linear_kernels()
    if args.linear_qkv_dtype == "bfloat16":  # probe, not a supported setting: bf16 q/k/v on the tensor cores
        from common_kernels.model import linear_math

        linear_math.LINEAR_ATTN_DTYPE = torch.bfloat16

    llm = dummy_llm(
        args.variant,
        max_model_len=args.length + args.decode_steps + 16,
        max_num_seqs=max(4, args.decode_batch, args.prompts),
        max_num_batched_tokens=16384,
        enforce_eager=not args.compiled,
        enable_prefix_caching=False,  # the same prompt again must be computed again
        gpu_memory_utilization=0.8,
    )
    rng = random.Random(0)
    if args.decode_batch:
        profile_decode(llm, args, rng)
        return
    prompts = random_prompts(rng, args.prompts, args.length)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    mode = "compiled" if args.compiled else "eager"
    tokens = args.length * args.prompts
    print(f"prefill {args.prompts} x {args.length}: {tokens / (time.perf_counter() - start):.0f} tokens/s ({mode})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))
    print(f"all kernels: {sum(kernel_times_us(prof).values()) / 1e3:,.2f} ms")


def kernel_times_us(prof) -> dict[str, float]:
    """Total device time per kernel name in a profile (microseconds)."""
    return {e.key: e.device_time_total for e in prof.key_averages() if e.device_time_total > 0}


def per_step_table(short: dict[str, float], long: dict[str, float], steps: int, rows: int) -> str:
    """Markdown: the kernels' time per decode step, `(long - short) / steps`, largest first."""
    per_step = {name: (long.get(name, 0.0) - short.get(name, 0.0)) / steps for name in long}
    total = sum(t for t in per_step.values() if t > 0)
    lines = ["| kernel | us per decode step | share |", "|---|---:|---:|"]
    for name, t in sorted(per_step.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f"| {name[:90]} | {t:,.1f} | {t / total:.1%} |")
    lines.append(f"| all kernels | {total:,.1f} | |")
    return "\n".join(lines)


def profile_decode(llm, args, rng) -> None:
    import torch
    from vllm import SamplingParams

    prompts = random_prompts(rng, args.decode_batch, args.length)
    short = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=1 + args.decode_steps, ignore_eos=True)
    llm.generate(prompts, long, use_tqdm=False)  # warm-up: every shape once
    times = []
    for params in (short, long):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
        times.append(kernel_times_us(prof))
    mode = "compiled" if args.compiled else "eager"
    print(f"decode, {args.decode_batch} sequences of {args.length} tokens, {args.decode_steps} steps ({mode}):\n")
    print(per_step_table(times[0], times[1], args.decode_steps, args.rows))


if __name__ == "__main__":
    main()
