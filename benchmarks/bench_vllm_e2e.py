"""End-to-end vLLM throughput on one GPU, dummy weights, the real Ring-mini sizes, every variant in one run:

- `ring-linear`: Ring-mini-linear-2.0 through this plugin (our kernels, fp32 state);
- `ring-linear-vllm-kernels`: the same model with vLLM's own lightning prefill / linear decode kernels in
  the linear layers (what our kernels add end to end);
- `softmax-twin`: Ring-mini-2.0, the all-softmax twin of the same sizes, on vLLM's native
  `BailingMoeV2ForCausalLM` (the same local config with its architecture swapped; it carries every
  Ling-2.0 field, so no remote code is needed).

Prefill: tokens/s of one prompt (batch 1) at each length. Decode: tokens/s of `--batch` sequences after
`--contexts` tokens each, measured as (batch x N) / (time(prefill + N+1 tokens) - time(prefill + 1 token)).
Each variant runs in its own process (`--worker`), in-process engine, so GPU memory is returned between
variants. Usage:

    python -m benchmarks.bench_vllm_e2e --json e2e.json
    python -m benchmarks.bench_vllm_e2e --variants ring-linear softmax-twin --prefill 4096 16384 --contexts 4096
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RELEASED_CONFIG = Path(__file__).parents[1] / "tests" / "data" / "ring-mini-linear-2.0.config.json"
VARIANTS = ("ring-linear", "ring-linear-vllm-kernels", "softmax-twin")


def write_config(variant: str, directory: Path) -> Path:
    config = json.loads(RELEASED_CONFIG.read_text())
    if variant == "softmax-twin":
        config["architectures"] = ["BailingMoeV2ForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


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

    from ring_linear_vllm.linear_attention import RingLinearAttention

    def attend(self, q, k, v, metadata):
        pool = self.kv_cache[0]
        q = q * self.head_dim**-0.5  # vLLM's kernels take a pre-scaled q

        def decode(q, k, v, kv_cache, state_indices, attn_metadata):
            return linear_attention_decode(
                q, k, v, kv_cache, self.decay_rate, attn_metadata.state_indices_tensor_d,
                q_end=attn_metadata.num_decode_tokens, slot_end=attn_metadata.num_decodes,
            )  # fmt: skip

        clear_linear_attention_cache_for_new_sequences(pool, metadata.state_indices_tensor, metadata)
        if metadata.num_prefills == 0:
            hidden = decode(q, k, v, pool, None, metadata)
        else:
            hidden = linear_attention_prefill_and_mix(
                q, k, v, pool, metadata.state_indices_tensor, metadata, self.decay_rate, 256,
                decode, MiniMaxText01LinearKernel.jit_linear_forward_prefix, self.layer_idx,
            )  # fmt: skip
        return hidden.view(q.shape)

    RingLinearAttention._attend = attend


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process (the kernel swap applies)
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    from vllm import LLM, SamplingParams, TokensPrompt

    if variant == "ring-linear-vllm-kernels":
        use_vllm_linear_kernels()
    longest = max([*args.prefill, *args.contexts])
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(
            model=str(write_config(variant, Path(tmp))),
            load_format="dummy",
            dtype="bfloat16",
            skip_tokenizer_init=True,
            max_model_len=longest + args.decode_tokens + 16,
            max_num_seqs=args.batch,
            max_num_batched_tokens=args.chunk,
            enable_prefix_caching=False,
            gpu_memory_utilization=args.gpu_memory_utilization,
            seed=0,
        )
    rng = random.Random(0)

    def prompts(n: int, length: int):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(1000, 150000) for _ in range(length)]) for _ in range(n)]

    def timed(batch, max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start

    timed(prompts(2, 1024), 8)  # warm-up: compile, graphs, autotuning
    result = {"variant": variant, "prefill_tokens_per_s": {}, "decode_tokens_per_s": {}}
    for length in args.prefill:
        seconds = min(timed(prompts(1, length), 1) for _ in range(2))
        result["prefill_tokens_per_s"][length] = length / seconds
    for context in args.contexts:
        first = timed(prompts(args.batch, context), 1)
        full = timed(prompts(args.batch, context), 1 + args.decode_tokens)
        result["decode_tokens_per_s"][context] = args.batch * args.decode_tokens / max(full - first, 1e-9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--prefill", type=int, nargs="*", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--contexts", type=int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
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
            capture_output=True,
            text=True,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{variant}: failed (exit {out.returncode})\n{out.stderr[-3000:]}")
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
