"""Is a served step bound by the host or by the GPU? Read a torch profiler trace of vLLM's engine (`bench_serve run
--torch-profile`) step by step.

vLLM's worker marks each step's `execute_model` with a range named `execute_context_C(T)_generation_G(N)` (C requests
prefilling T tokens, G decoding N). Between the starts of two steps, the GPU is busy for the union of its kernels' and
copies' intervals; the rest of the period it waited for the host. A GPU busy for most of each period is GPU-bound (a
faster kernel helps, host work does not); a GPU idle for much of it is host-bound (the scheduler, metadata and launches
set the pace).

    python -m benchmarks.served_timeline TRACE.json.gz [--top 15]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

STEP = re.compile(r"^execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")
HOST_RANGE = "user_annotation"  # the profiler also spans each range on the GPU (`gpu_user_annotation`): not a step
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass
class Step:
    start_us: float
    host_us: float  # the execute_model range on the host: input preparation and launches
    prefill_tokens: int
    decode_requests: int
    period_us: float = 0.0  # to the next step's start
    gpu_busy_us: float = 0.0  # union of GPU work inside the period


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def steps_of(events: list[dict]) -> list[Step]:
    """The engine's steps in time order, each with its period to the next (the last, with no next, is dropped)."""
    steps = []
    for e in events:
        match = STEP.match(str(e.get("name", "")))
        if match and e.get("ph") == "X" and e.get("cat") == HOST_RANGE:
            _, prefill, decodes, _ = (int(g) for g in match.groups())
            steps.append(Step(float(e["ts"]), float(e.get("dur", 0.0)), prefill, decodes))
    steps.sort(key=lambda s: s.start_us)
    for step, after in itertools.pairwise(steps):
        step.period_us = after.start_us - step.start_us
    return steps[:-1]


def gpu_work(events: list[dict]) -> list[dict]:
    """The kernels, copies and memsets the GPU ran."""
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]


def gpu_intervals(events: list[dict]) -> list[tuple[float, float]]:
    return sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in gpu_work(events))


def busy_within(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of `intervals` (sorted by start) clipped to [start, end)."""
    busy, reach = 0.0, start
    for a, b in intervals:
        if a >= end:
            break
        a, b = max(a, reach), min(b, end)
        if b > a:
            busy += b - a
            reach = b
    return busy


def kernel_totals(events: list[dict]) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for e in gpu_work(events):
        totals[e["name"]] += float(e.get("dur", 0.0))
    return totals


def describe(path: Path, top: int = 15) -> list[str]:
    events = load_events(path)
    steps = steps_of(events)
    if not steps:
        return [f"{path.name}: no engine steps (no execute_context_* ranges): not a vLLM worker trace"]
    intervals = gpu_intervals(events)
    for step in steps:
        step.gpu_busy_us = busy_within(intervals, step.start_us, step.start_us + step.period_us)
    lines = [f"{path.name}: {len(steps)} steps"]
    kinds = (("decode-only", [s for s in steps if s.prefill_tokens == 0]),
             ("with a prefill", [s for s in steps if s.prefill_tokens > 0]))  # fmt: skip
    for kind, chosen in kinds:
        if not chosen:
            continue
        period = statistics.median(s.period_us for s in chosen)
        gpu = statistics.median(s.gpu_busy_us for s in chosen)
        host = statistics.median(s.host_us for s in chosen)
        share = sum(s.gpu_busy_us for s in chosen) / sum(s.period_us for s in chosen)
        decodes = statistics.median(s.decode_requests for s in chosen)
        lines.append(
            f"  {kind} ({len(chosen)} steps, median {decodes:.0f} decoding): period {period / 1e3:.2f} ms, GPU busy "
            f"{gpu / 1e3:.2f} ms ({share:.0%} of the time), execute_model on the host {host / 1e3:.2f} ms (medians)"
        )
    window = (steps[0].start_us, steps[-1].start_us + steps[-1].period_us)
    totals = kernel_totals([e for e in events if window[0] <= float(e.get("ts", -1)) < window[1]])
    all_gpu = sum(totals.values()) or 1.0
    lines.append(f"  GPU work by kernel over these steps (of {all_gpu / 1e3:.1f} ms):")
    for name, us in sorted(totals.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"    {us / all_gpu:6.1%} {us / len(steps):8.1f} us/step  {name[:110]}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    for path in args.traces:
        print("\n".join(describe(path, args.top)))


if __name__ == "__main__":
    main()
