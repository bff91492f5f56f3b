"""Why a served ring-linear decodes slower on a second pass than on its first (RESULTS.md runs K and M: TPOT 6.1
then 9.6 ms on one server, the twin's unchanged): the same requests several times through one in-process engine,
each pass's wall time, GPU kernel time and caching-allocator counters, so a pass that is slower on the host
(wall time up, kernel time flat) tells apart from one slower on the GPU (kernel time up) or in the allocator
(retries, device allocations).

python -m benchmarks.probe_second_pass --variant ring-linear
python -m benchmarks.probe_second_pass --variant softmax-twin --prefix-caching
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import time

from benchmarks.bench_vllm_e2e import VARIANTS, dummy_llm, random_prompts
from benchmarks.profile_vllm_prefill import kernel_times_us

ALLOCATOR_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def allocator_counters(stats: dict) -> dict[str, int]:
    """The caching allocator's counters that mean host-side stalls, plus its reserved bytes now."""
    picked = {name: int(stats.get(name, 0)) for name in ALLOCATOR_COUNTERS}
    picked["reserved_bytes"] = int(stats.get("reserved_bytes.all.current", 0))
    return picked


def counter_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What a pass added to each counter (reserved bytes: the change)."""
    return {name: after[name] - before.get(name, 0) for name in after}


def gpu_state() -> str:
    """The GPU's SM clock, power and temperature now (a throttled GPU would also slow a later pass)."""
    query = ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader", "-i", "0"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvidia-smi failed: {error}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="ring-linear")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64, help="max_num_seqs")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--prefix-caching", action="store_true", help="vLLM's hybrid 'align' mode for ring-linear")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its allocator is ours to read
    import torch
    from vllm import SamplingParams

    prompts = random_prompts(random.Random(0), args.prompts, args.length)
    params = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
    llm = dummy_llm(
        args.variant,
        max_model_len=args.length + args.output + 16,
        max_num_seqs=args.concurrency,
        enable_prefix_caching=args.prefix_caching,
        gpu_memory_utilization=0.9,
    )
    print(f"{args.variant}: {args.prompts} prompts of {args.length}, {args.output} out, {args.concurrency} at a time")
    print(
        "| pass | wall s | out tok/s | GPU kernels s | " + " | ".join(ALLOCATOR_COUNTERS) + " | reserved MiB change |"
    )
    print("|---|---:|---:|---:|" + "---:|" * (len(ALLOCATOR_COUNTERS) + 1))
    for index in range(args.passes):
        torch.cuda.synchronize()
        before = allocator_counters(torch.cuda.memory_stats())
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        delta = counter_deltas(before, allocator_counters(torch.cuda.memory_stats()))
        kernels = sum(kernel_times_us(prof).values()) / 1e6
        counts = " | ".join(str(delta[name]) for name in ALLOCATOR_COUNTERS)
        rate = args.prompts * args.output / wall
        reserved = delta["reserved_bytes"] / 2**20
        print(
            f"| {index + 1} | {wall:.2f} | {rate:,.0f} | {kernels:.2f} | {counts} | {reserved:,.0f} | {gpu_state()} |"
        )


if __name__ == "__main__":
    main()
