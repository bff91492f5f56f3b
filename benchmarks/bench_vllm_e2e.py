"""End-to-end vLLM throughput on one GPU, dummy weights, the real Ring-mini sizes, every variant in one run:

- `ring-linear`: Ring-mini-linear-2.0 through this plugin (our kernels, fp32 state);
- `ring-linear-vllm-kernels`: the same model with vLLM's own lightning prefill / linear decode kernels in
  the linear layers (what our kernels add end to end);
- `softmax-twin`: Ring-mini-2.0, the all-softmax twin of the same sizes, on vLLM's native
  `BailingMoeV2ForCausalLM` (the same local config with its architecture swapped; it carries every
  Ling-2.0 field, so no remote code is needed).

Prefill: tokens/s of one prompt (batch 1) at each length, timed over `generate` (prompt + 1 token), best of
`prefill_repeats(length)` (more for short prompts: a 4K prefill takes about 60 ms and its timing is noisy).
Decode: tokens/s of a batch of sequences once every one of them has finished its prefill, the median of
`--decode-windows` windows of `--decode-steps` engine steps that each decode one token per sequence (prefill
excluded), for each `CONTEXTxBATCH` pair of `--decode`. Each variant runs in its own process (`--worker`)
with the engine in that process, so GPU memory is returned between variants and the kernel swaps apply. Usage:

    python -m benchmarks.bench_vllm_e2e --json e2e.json
    python -m benchmarks.bench_vllm_e2e --variants ring-linear softmax-twin --prefill 4096 16384 --decode 4096x64
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RELEASED_CONFIG = Path(__file__).parents[1] / "tests" / "data" / "ring-mini-linear-2.0.config.json"
VARIANTS = ("ring-linear", "ring-linear-vllm-kernels", "softmax-twin")


def write_config(variant: str, directory: Path) -> Path:
    config = json.loads(RELEASED_CONFIG.read_text())
    if variant == "softmax-twin":
        config["architectures"] = ["BailingMoeV2ForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def dummy_llm(variant: str, **settings):
    """`vllm.LLM` on dummy weights at the released Ring-mini sizes (`variant`'s architecture), bf16, token ids in
    and out; `settings` add to or override these."""
    from vllm import LLM

    with tempfile.TemporaryDirectory() as tmp:  # vLLM has read the config once the engine is built
        return LLM(
            **{
                "model": str(write_config(variant, Path(tmp))),
                "load_format": "dummy",
                "dtype": "bfloat16",
                "skip_tokenizer_init": True,
            }
            | settings
        )


def random_prompts(rng: random.Random, n: int, length: int) -> list:
    """`n` prompts of `length` random ordinary token ids."""
    from vllm import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 150000) for _ in range(length)]) for _ in range(n)]


def use_vllm_linear_kernels() -> None:
    """Swap the plugin's linear-attention kernels for vLLM's (lightning prefill per request, linear decode)."""
    from vllm.model_executor.layers.mamba.linear.bailing_linear_attn import (
        clear_linear_attention_cache_for_new_sequences,
        linear_attention_prefill_and_mix,
    )
    from vllm.model_executor.layers.mamba.linear.minimax_linear_attn import (
        MiniMaxText01LinearKernel,
        linear_attention_decode,
    )

    from ring_linear_vllm.compat import layer_metadata
    from ring_linear_vllm.linear_attention import RingLinearAttention

    def attend(self, q, k, v, out):
        metadata = layer_metadata(self.prefix)
        if metadata is None:  # profiling run
            out.zero_()
            return
        num_tokens = metadata.num_decode_tokens + metadata.num_prefill_tokens
        pool = self.kv_cache[0]
        q = q[:num_tokens] * self.head_dim**-0.5  # vLLM's kernels take a pre-scaled q
        k, v = k[:num_tokens].contiguous(), v[:num_tokens].to(q.dtype)
        slope = self.decay_rate.view(-1, 1, 1)  # the [H, 1, 1] slope tensor vLLM's Bailing layer passes

        def decode(q, k, v, kv_cache, state_indices, attn_metadata):
            return linear_attention_decode(
                q, k, v, kv_cache, slope, attn_metadata.state_indices_tensor_d,
                q_end=attn_metadata.num_decode_tokens, slot_end=attn_metadata.num_decodes,
            )  # fmt: skip

        clear_linear_attention_cache_for_new_sequences(pool, metadata.state_indices_tensor, metadata)
        if metadata.num_prefills == 0:
            hidden = decode(q, k, v, pool, None, metadata)
        else:
            hidden = linear_attention_prefill_and_mix(
                q, k, v, pool, metadata.state_indices_tensor, metadata, slope, 256,
                decode, MiniMaxText01LinearKernel.jit_linear_forward_prefix, self.layer_idx,
            )  # fmt: skip
        out[:num_tokens] = hidden.view(q.shape)
        out[num_tokens:] = 0

    RingLinearAttention.attend = attend


def parse_decode(pair: str) -> tuple[int, int]:
    context, batch = pair.lower().split("x")
    return int(context), int(batch)


def early_decode_tokens(context: int, batch: int, chunk: int) -> int:
    """A bound on the tokens the first request decodes while the others prefill (about context x batch / chunk
    steps; twice that, as decodes share each step's token budget)."""
    return 2 * context * batch // chunk + 8


def prefill_repeats(length: int) -> int:
    """How many times a prefill of `length` tokens is timed: about 0.5 s of prefill in all, at least twice."""
    return max(2, min(8, 65536 // length))


def decode_tokens_per_s(
    llm, prompts: list, steps: int, windows: int, max_tokens: int, deadline_s: float = 900.0
) -> float:
    """The median tokens/s of `windows` windows of `steps` engine steps once every sequence is decoding (its
    prefill is done): one window was seen to read 40% low once, so one is not trusted.

    `max_tokens` bounds each request (the early ones decode while the later ones prefill), so nothing runs on
    to the model length even if the final abort were lost."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    ids = [f"decode-{i}" for i in range(len(prompts))]  # external ids: what abort_request takes
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    started: set[str] = set()
    steps_to_start = 0
    give_up = time.perf_counter() + deadline_s
    while len(started) < len(ids):  # chunked prefills (and the early requests' decodes) until all decode
        started.update(o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids)
        steps_to_start += 1
        if steps_to_start % 100 == 0:
            print(f"  {len(started)}/{len(ids)} decoding after {steps_to_start} steps", file=sys.stderr, flush=True)
        if time.perf_counter() > give_up:
            engine.abort_request(ids)
            raise RuntimeError(f"only {len(started)}/{len(ids)} sequences reached decode: too little cache?")
    rate = median_window_rate(engine.step, steps, windows)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return rate


def median_window_rate(
    step: Callable[[], list], steps: int, windows: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """The median over `windows` windows of `steps` calls of `step` (an engine step returning request outputs)
    of the new tokens per second."""
    rates = []
    for _ in range(windows):
        tokens, start = 0, clock()
        for _ in range(steps):
            tokens += sum(len(o.outputs[0].token_ids) for o in step() if o.outputs)
        rates.append(tokens / (clock() - start))
    return statistics.median(rates)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process (the kernel swap applies)
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    from vllm import SamplingParams

    if variant == "ring-linear-vllm-kernels":
        use_vllm_linear_kernels()
    # (context, batch, max_tokens) per decode case: max_tokens covers the early decodes and the timed steps
    decode = [
        (context, batch, early_decode_tokens(context, batch, args.chunk) + args.decode_steps * args.decode_windows)
        for context, batch in map(parse_decode, args.decode)
    ]
    longest = max([*args.prefill, *(context + max_tokens for context, _, max_tokens in decode)])
    llm = dummy_llm(
        variant,
        max_model_len=longest + 16,
        max_num_seqs=max([1, *(batch for _, batch, _ in decode)]),
        max_num_batched_tokens=args.chunk,
        enable_prefix_caching=False,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=0,
    )
    rng = random.Random(0)

    def prompts(n: int, length: int):
        return random_prompts(rng, n, length)

    def timed(batch, max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start

    timed(prompts(2, 1024), 8)  # warm-up: compile, graphs, autotuning
    result = {"variant": variant, "prefill_tokens_per_s": {}, "decode_tokens_per_s": {}}
    for length in args.prefill:
        seconds = min(timed(prompts(1, length), 1) for _ in range(prefill_repeats(length)))
        result["prefill_tokens_per_s"][length] = length / seconds
        print(f"{variant}: prefill {length}: {length / seconds:.0f} tokens/s", file=sys.stderr, flush=True)
    for context, batch, max_tokens in decode:
        rate = decode_tokens_per_s(llm, prompts(batch, context), args.decode_steps, args.decode_windows, max_tokens)
        result["decode_tokens_per_s"][f"{context}x{batch}"] = rate
        print(f"{variant}: decode {context}x{batch}: {rate:.0f} tokens/s", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--decode", nargs="*", default=["4096x64", "16384x64", "65536x64"], help="CONTEXTxBATCH pairs")
    parser.add_argument("--decode-steps", type=int, default=64, help="engine steps in one timed decode window")
    parser.add_argument("--decode-windows", type=int, default=3, help="timed decode windows (the median is kept)")
    parser.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (chunked prefill)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args.worker, args)), flush=True)
        return
    results = []
    passthrough = sys.argv[1:]
    for variant in args.variants:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_vllm_e2e", *passthrough, "--worker", variant],
            stdout=subprocess.PIPE,  # vLLM logs and the RESULT line; progress and errors go to stderr as they come
            text=True,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{variant}: failed (exit {out.returncode})\n{out.stdout[-3000:]}")
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def print_table(results: list[dict]) -> None:
    twin = next((r for r in results if r["variant"] == "softmax-twin"), None)
    print(f"{'variant':26} {'phase':8} {'tokens':>8} {'tokens/s':>12} {'x softmax twin':>15}")
    for r in results:
        for phase in ("prefill", "decode"):
            for size, rate in r[f"{phase}_tokens_per_s"].items():
                base = twin[f"{phase}_tokens_per_s"].get(size) if twin else None
                ratio = f"{rate / base:.2f}x" if base else ""
                print(f"{r['variant']:26} {phase:8} {size:>8} {rate:12.0f} {ratio:>15}")


if __name__ == "__main__":
    main()
