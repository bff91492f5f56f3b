"""Where a vLLM prefill step spends GPU time: torch.profiler over one prompt, dummy weights, eager engine. Usage:

python -m benchmarks.profile_vllm_prefill --variant ring-linear --length 16384
RING_LINEAR_FP32_DOT=tf32x3 python -m benchmarks.profile_vllm_prefill    # other fp32 products
python -m benchmarks.profile_vllm_prefill --linear-qkv-dtype bfloat16     # bf16 q/k/v into the kernels
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from benchmarks.bench_vllm_e2e import VARIANTS, write_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="ring-linear")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--linear-qkv-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compiled", action="store_true", help="torch.compile and CUDA graphs, as served")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: the probe's patch applies
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    if args.linear_qkv_dtype == "bfloat16":  # probe, not a supported setting: bf16 q/k/v on the tensor cores
        from common_kernels.model import linear_math

        linear_math.LINEAR_ATTN_DTYPE = torch.bfloat16

    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(
            model=str(write_config(args.variant, Path(tmp))),
            load_format="dummy",
            dtype="bfloat16",
            skip_tokenizer_init=True,
            max_model_len=args.length + 16,
            max_num_seqs=4,
            max_num_batched_tokens=16384,
            enforce_eager=not args.compiled,
            enable_prefix_caching=False,  # the same prompt again must be computed again
            gpu_memory_utilization=0.8,
        )
    rng = random.Random(0)
    prompt = TokensPrompt(prompt_token_ids=[rng.randrange(1000, 150000) for _ in range(args.length)])
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([prompt], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    mode = "compiled" if args.compiled else "eager"
    print(f"prefill {args.length}: {args.length / (time.perf_counter() - start):.0f} tokens/s ({mode})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params, use_tqdm=False)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
