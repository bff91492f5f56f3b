"""What a mixed engine step costs: decodes alone against the same decodes beside a short prefill, ring-linear against
the twin, wall time and GPU kernel time per step (issues 11 and 13).

A served warm pass with prefix caching decodes slower than the cold pass, evenly (RESULTS.md run P: the median gap
between tokens 5.7 -> 8.2 ms at 4K) with the host's CPU and GC unchanged. In that pass each step holds the running
requests' decodes and new requests' 512-token uncached suffixes. Decode-only steps replay a full CUDA graph; a mixed
step runs the compiled pieces with our linear attention eager between them (prefill and decode launches per layer),
where the twin runs one FlashAttention call. This probe keeps `--decodes` requests decoding in one in-process
engine and times steps of two kinds:

- decode: only the running requests' next tokens;
- mixed: the same, plus `--joins` new requests of `--suffix` tokens each step (prefilled, one token, finished).

Per kind it prints the median wall time per step and the GPU kernel time per step (torch.profiler): wall well above
kernel time means the step waits on the host (launches), kernel time up means the GPU work itself.

python -m benchmarks.probe_mixed_step --variant ring-linear
python -m benchmarks.probe_mixed_step --variant softmax-twin
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from benchmarks.bench_vllm_e2e import dummy_llm, random_prompts
from benchmarks.profile_vllm_prefill import kernel_times_us


def timed_steps(engine, steps: int, joins_per_step: int, suffix_prompts, params_once) -> list[float]:
    """Wall seconds of `steps` engine steps, `joins_per_step` new one-token requests added before each."""
    walls = []
    for step in range(steps):
        for j in range(joins_per_step):
            engine.add_request(f"join-{step}-{j}-{time.monotonic_ns()}", next(suffix_prompts), params_once)
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("ring-linear", "softmax-twin"), default="ring-linear")
    parser.add_argument("--decodes", type=int, default=64, help="requests decoding throughout")
    parser.add_argument("--context", type=int, default=4096, help="their prompt length")
    parser.add_argument("--joins", type=int, default=1, help="new requests per mixed step")
    parser.add_argument("--suffix", type=int, default=512, help="each new request's prompt length")
    parser.add_argument("--steps", type=int, default=40, help="steps timed per kind")
    parser.add_argument(
        "--host-profile", type=int, default=0, metavar="N",
        help="also run cProfile over the decode steps and print the N functions with the most own time",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its steps are ours to time
    import torch
    from vllm import SamplingParams

    total_steps = 6 * args.steps + 64
    llm = dummy_llm(
        args.variant,
        max_model_len=args.context + total_steps + 64,
        max_num_seqs=args.decodes + 2 * args.joins,
        max_num_batched_tokens=max(8192, args.joins * args.suffix + args.decodes),
        enable_prefix_caching=False,
        gpu_memory_utilization=0.8,
        async_scheduling=False,  # one step() = one scheduled and executed batch, so each wall time is one step's
    )
    engine = llm.llm_engine
    rng = random.Random(0)
    running = SamplingParams(temperature=0.0, max_tokens=total_steps, ignore_eos=True)
    once = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(rng, args.decodes, args.context)):
        engine.add_request(f"running-{i}", prompt, running)
    suffixes = iter(random_prompts(rng, 4 * args.steps * args.joins + 8, args.suffix))
    started: set[str] = set()
    while len(started) < args.decodes:  # until every running request has prefilled and sampled
        started |= {out.request_id for out in engine.step() if out.outputs and out.outputs[0].token_ids}
    timed_steps(engine, 8, args.joins, suffixes, once)  # warm-up: every shape of both kinds once
    timed_steps(engine, 8, 0, suffixes, once)
    rows = []
    for kind, joins in (("decode", 0), ("mixed", args.joins)):
        walls = timed_steps(engine, args.steps, joins, suffixes, once)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            timed_steps(engine, args.steps, joins, suffixes, once)
        kernel_ms = sum(kernel_times_us(prof).values()) / 1e3 / args.steps
        rows.append((kind, 1e3 * statistics.median(walls), kernel_ms))
    print(
        f"{args.variant}: {args.decodes} decodes of {args.context}-token prompts; mixed steps add {args.joins} "
        f"prefill(s) of {args.suffix} tokens\n"
    )
    print("| step | wall ms (median) | GPU kernel ms | wall - kernel |\n|---|---:|---:|---:|")
    for kind, wall, kernel in rows:
        print(f"| {kind} | {wall:.2f} | {kernel:.2f} | {wall - kernel:+.2f} |")
    if args.host_profile:
        print_host_profile(engine, args.steps, suffixes, once, args.host_profile)


def print_host_profile(engine, steps: int, suffix_prompts, params_once, top: int) -> None:
    """Where a decode step's host time goes (the engine core runs in this process): cProfile's top functions."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    timed_steps(engine, steps, 0, suffix_prompts, params_once)
    profiler.disable()
    print(f"\nhost profile of {steps} decode steps, by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":
    main()
