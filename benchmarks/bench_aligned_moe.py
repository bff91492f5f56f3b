"""Aligned mode's MoE experts against vLLM's fused MoE in one process on one GPU, at Ring-mini's shapes in bf16:
what bitwise rollouts cost per MoE layer, and which fixed tiles to ship (`--tiles` tries several; aligned mode
keeps one set for every batch, so the choice is a trade between decode and prefill).

    python -m benchmarks.bench_aligned_moe [--tokens 1 64 512 4096 16384] [--tiles 64,64,32 16,64,32 64,128,64]

Timing: `triton.testing.do_bench` (median, eager: both sides include their host-side set-up). The ratio is vLLM's
time over ours (below 1: ours is slower). Each output is also compared with vLLM's (relative RMS): the two round
differently, so they agree to bf16 accuracy, not bit for bit.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

from common_kernels.ops.moe import aligned
from common_kernels.testing import rel_rms_error

RING_MINI = {"experts": 256, "top_k": 8, "hidden": 2048, "intermediate": 512}


def parse_tiles(text: str) -> tuple[int, int, int]:
    """ "BLOCK_M,BLOCK_N,BLOCK_K", each a power of two of at least 16 (what `tl.dot` takes)."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 16 and int(p) & (int(p) - 1) == 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--tiles {text!r}: give BLOCK_M,BLOCK_N,BLOCK_K, powers of two >= 16")
    m, n, k = (int(p) for p in parts)
    return m, n, k


def inputs(tokens: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    E, k, D, I = (RING_MINI[key] for key in ("experts", "top_k", "hidden", "intermediate"))
    ids = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(tokens)])
    return {
        "x": torch.randn(tokens, D, generator=generator).bfloat16().cuda(),
        "w13": (torch.randn(E, 2 * I, D, generator=generator) * 0.02).bfloat16().cuda(),
        "w2": (torch.randn(E, D, I, generator=generator) * 0.02).bfloat16().cuda(),
        "ids": ids.cuda(),
        "weights": (torch.rand(tokens, k, generator=generator) + 0.1).cuda(),
    }


def ours(t: dict[str, torch.Tensor], tiles: tuple[int, int, int]):
    def call() -> torch.Tensor:
        aligned.BLOCK_M, aligned.BLOCK_N, aligned.BLOCK_K = tiles
        return aligned.aligned_expert_outputs(t["x"], t["w13"], t["w2"], t["ids"], t["weights"])

    return call


def vllms(t: dict[str, torch.Tensor]):
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except ImportError:
        return None
    ids = t["ids"].to(torch.int32)
    return lambda: fused_experts(t["x"], t["w13"], t["w2"], t["weights"], ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512, 4096, 16384])
    parser.add_argument(
        "--tiles", type=parse_tiles, nargs="+", default=[(aligned.BLOCK_M, aligned.BLOCK_N, aligned.BLOCK_K)]
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_aligned_moe: needs a CUDA GPU")
    shipped = (aligned.BLOCK_M, aligned.BLOCK_N, aligned.BLOCK_K)
    print(f"{torch.cuda.get_device_name()}; Ring-mini experts {RING_MINI}; shipped tiles {shipped}")
    print("| tokens | provider | ms | vLLM / ours | rel. RMS vs vLLM |")
    print("|---:|---|---:|---:|---:|")
    try:
        for tokens in args.tokens:
            t = inputs(tokens, torch.Generator().manual_seed(tokens))
            theirs = vllms(t)
            their_ms = triton.testing.do_bench(theirs, return_mode="median") if theirs else None
            if theirs:
                print(f"| {tokens} | vLLM fused_experts | {their_ms:.3f} | | |")
            for tiles in args.tiles:
                call = ours(t, tiles)
                ms = triton.testing.do_bench(call, return_mode="median")
                ratio = f"{their_ms / ms:.2f}" if theirs else "no vLLM"
                err = f"{rel_rms_error(theirs().float(), call()):.1e}" if theirs else ""
                print(f"| {tokens} | aligned {tiles} | {ms:.3f} | {ratio} | {err} |", flush=True)
    finally:
        aligned.BLOCK_M, aligned.BLOCK_N, aligned.BLOCK_K = shipped


if __name__ == "__main__":
    main(sys.argv[1:])
