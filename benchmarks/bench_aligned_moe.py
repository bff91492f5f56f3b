"""Aligned mode's MoE experts and router GEMM against vLLM's fused MoE and cuBLAS in one process on one GPU, at
Ring-mini's shapes: what bitwise rollouts cost per MoE layer, and which tiles to ship.

    python -m benchmarks.bench_aligned_moe [--tokens 1 64 512 4096 16384] [--tiles 64,64,32 16,64,128,4,3,1]
        [--router-tiles 64,64,64 64,32,64] [--projections --projection-tiles 64,128,64 16,64,64] [--cuda-graph]

`--tiles` (BLOCK_M,BLOCK_N,BLOCK_K[,warps,stages[,swap]]; swap 1 multiplies the transposed tiles) and
`--router-tiles` (BLOCK_T,BLOCK_E,BLOCK_D) force one set for every batch. Aligned mode may pick tiles by batch size
only where a tile's shape does not change a row's bits, so each row also says whether its output is bit-equal to the
first set's on the same inputs.

Timing: `triton.testing.do_bench` (median, eager: both sides include their host-side set-up), or with `--cuda-graph`
`do_bench_cudagraph` (device time of the replayed launches, as a served decode step pays it). The ratio is the
baseline's time over ours (below 1: ours is slower). The experts are also compared with vLLM's (relative RMS): the
two round differently, so they agree to bf16 accuracy, not bit for bit.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

import torch
import triton

from common_kernels.ops.moe import aligned, router_gemm
from common_kernels.testing import rel_rms_error

RING_MINI = {"experts": 256, "top_k": 8, "hidden": 2048, "intermediate": 512}


def parse_tiles(text: str) -> tuple[int, ...]:
    """ "A,B,C" block sizes, each a power of two of at least 16 (what `tl.dot` takes), optionally ",warps,stages"
    and then ",swap" (0 or 1)."""
    parts = text.split(",")
    blocks_ok = all(p.isdigit() and int(p) >= 16 and int(p) & (int(p) - 1) == 0 for p in parts[:3])
    launch_ok = all(p.isdigit() and int(p) > 0 for p in parts[3:5]) and all(p in ("0", "1") for p in parts[5:])
    if len(parts) not in (3, 5, 6) or not blocks_ok or not launch_ok:
        raise argparse.ArgumentTypeError(
            f"--tiles {text!r}: give BLOCK_M,BLOCK_N,BLOCK_K (powers of two >= 16), optionally then warps,stages "
            "and then swap (0 or 1)"
        )
    return tuple(int(p) for p in parts[:5]) + tuple(p == "1" for p in parts[5:])


def inputs(tokens: int, generator: torch.Generator, shape: dict[str, int] = RING_MINI) -> dict[str, torch.Tensor]:
    """bf16 activations and expert weights of `shape`, each token's top-k ids distinct and uniform over the experts
    (trained routing, spread), fp32 routing weights."""
    E, k, D, I = (shape[key] for key in ("experts", "top_k", "hidden", "intermediate"))
    ids = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(tokens)])
    return {
        "x": torch.randn(tokens, D, generator=generator).bfloat16().cuda(),
        "w13": (torch.randn(E, 2 * I, D, generator=generator) * 0.02).bfloat16().cuda(),
        "w2": (torch.randn(E, D, I, generator=generator) * 0.02).bfloat16().cuda(),
        "ids": ids.cuda(),
        "weights": (torch.rand(tokens, k, generator=generator) + 0.1).cuda(),
    }


_CUDA_GRAPH = False  # `--cuda-graph`


def time_ms(call: Callable[[], torch.Tensor]) -> float:
    """`call`'s median time: eager, or replayed from a CUDA graph (`--cuda-graph`)."""
    if _CUDA_GRAPH:
        return triton.testing.do_bench_cudagraph(call, return_mode="median")
    return triton.testing.do_bench(call, return_mode="median")


def use_expert_tiles(tiles: tuple[int, ...]) -> None:
    aligned.TILE_SCHEDULE = ((None, aligned.ExpertTiles(*tiles)),)


def use_router_tiles(tiles: tuple[int, ...]) -> None:
    # bf16 activations, fp32 weight: the split-weight path, one set for every batch
    router_gemm.SPLIT_WEIGHT_DECODE_TILES = router_gemm.SPLIT_WEIGHT_TILES = tiles


def tile_set_rows(
    tokens: int,
    label: str,
    tile_sets: list[tuple[int, ...]],
    use_tiles: Callable[[tuple[int, ...]], None],
    call: Callable[[], torch.Tensor],
    baseline_ms: float | None,
    note: Callable[[torch.Tensor], str] = lambda got: "",
) -> None:
    """A row per tile set: `call` timed with the set in place, the baseline's time over it, and whether its output
    is bit-equal to the first set's (`note` adds a column's text before that)."""
    first = None
    for tiles in tile_sets:
        use_tiles(tiles)
        ms = time_ms(call)
        got = call()
        first = got if first is None else first
        ratio = f"{baseline_ms / ms:.2f}" if baseline_ms else "no vLLM"
        equal = torch.equal(got, first)
        print(f"| {tokens} | {label} {tiles} | {ms:.3f} | {ratio} | {note(got)}bits = first: {equal} |", flush=True)


def shared_expert_rows(tokens: int, tile_sets: list[tuple[int, ...]], generator: torch.Generator) -> None:
    """The shared expert (one SwiGLU expert every token takes, 2,048 -> 512) per tile set against cuBLAS's bf16
    GEMMs, as default mode runs it: a decode's few rows make few tiles, so its launch is not the routed experts'."""
    D, I = RING_MINI["hidden"], RING_MINI["intermediate"]
    x = torch.randn(tokens, D, generator=generator).bfloat16().cuda()
    w13 = (torch.randn(1, 2 * I, D, generator=generator) * 0.02).bfloat16().cuda()
    w2 = (torch.randn(1, D, I, generator=generator) * 0.02).bfloat16().cuda()
    ids, weights = aligned.every_token(x)

    def plain() -> torch.Tensor:
        gate, up = torch.nn.functional.linear(x, w13[0]).chunk(2, dim=-1)
        return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[0])

    plain_ms = time_ms(plain)
    print(f"| {tokens} | shared expert, cuBLAS bf16 | {plain_ms:.3f} | | |")
    call = lambda: aligned.aligned_expert_outputs(x, w13, w2, ids, weights)  # noqa: E731
    tile_set_rows(tokens, "shared", tile_sets, use_expert_tiles, call, plain_ms)


def merged_shared_rows(tokens: int, t: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """The routed experts and the shared expert with the shipped tiles: two launches' worth, then the shared expert
    riding in the routed experts' launches (as `aligned_moe` runs Ring-mini's layers), and whether the bits agree."""
    D, I = RING_MINI["hidden"], RING_MINI["intermediate"]
    shared_w13 = (torch.randn(1, 2 * I, D, generator=generator) * 0.02).bfloat16().cuda()
    shared_w2 = (torch.randn(1, D, I, generator=generator) * 0.02).bfloat16().cuda()
    x, w13, w2 = t["x"], t["w13"], t["w2"]
    every = aligned.every_token(x)
    ids = torch.cat([t["ids"], every[0] + w13.shape[0]], dim=1)
    weights = torch.cat([t["weights"], every[1]], dim=1)

    def apart() -> torch.Tensor:
        routed = aligned.aligned_expert_outputs(x, w13, w2, t["ids"], t["weights"])
        return routed + aligned.aligned_expert_outputs(x, shared_w13, shared_w2, *every)

    def together() -> torch.Tensor:
        return aligned._expert_outputs(x, w13, w2, ids, weights, shared_w13[0], shared_w2[0])

    apart_ms, together_ms = time_ms(apart), time_ms(together)
    equal = torch.equal(apart(), together())
    print(f"| {tokens} | routed, then shared (shipped tiles) | {apart_ms:.3f} | | |")
    print(f"| {tokens} | routed and shared in one launch | {together_ms:.3f} | {apart_ms / together_ms:.2f} | "
          f"bits = apart: {equal} |", flush=True)  # fmt: skip


def router_rows(tokens: int, tile_sets: list[tuple[int, ...]], generator: torch.Generator) -> None:
    """The invariant router GEMM (2,048 -> 256, bf16 activations, fp32 weight: the split-weight tensor-core path) per
    tile set against cuBLAS's fp32 GEMM."""
    x = torch.randn(tokens, RING_MINI["hidden"], generator=generator).bfloat16().cuda()
    w = (torch.randn(RING_MINI["experts"], RING_MINI["hidden"], generator=generator) * 0.02).cuda()
    plain_ms = time_ms(lambda: torch.nn.functional.linear(x.float(), w))
    print(f"| {tokens} | router, cuBLAS fp32 | {plain_ms:.3f} | | |")
    call = lambda: router_gemm.invariant_router_logits(x, w)  # noqa: E731
    tile_set_rows(tokens, "router", tile_sets, use_router_tiles, call, plain_ms)


def use_projection_tiles(tiles: tuple[int, ...]) -> None:
    # 16-bit activations and weight: the tensor-core path, one set for every batch
    router_gemm.TENSOR_CORE_DECODE_TILES = router_gemm.TENSOR_CORE_TILES = tiles


def projection_rows(tokens: int, tile_sets: list[tuple[int, ...]], generator: torch.Generator) -> None:
    """A linear layer's projections (2,048 -> 6,144 QKV and 2,048 -> 2,048, bf16) through the invariant tensor-core
    GEMM per tile set (its fp32 output rounded to bf16, as a projection's), against cuBLAS and, where vLLM is
    installed, the batch-invariant GEMM vLLM's linear layers run under `VLLM_BATCH_INVARIANT=1` (what aligned mode's
    projections ran before they were ours)."""
    x = torch.randn(tokens, RING_MINI["hidden"], generator=generator).bfloat16().cuda()
    theirs = vllm_batch_invariant_linear()
    for width in (6144, 2048):
        w = (torch.randn(width, RING_MINI["hidden"], generator=generator) * 0.02).bfloat16().cuda()
        plain_ms = time_ms(lambda: torch.nn.functional.linear(x, w))  # noqa: B023
        print(f"| {tokens} | projection 2048->{width}, cuBLAS bf16 | {plain_ms:.3f} | | |")
        if theirs is not None:
            their_ms = time_ms(lambda: theirs(x, w))  # noqa: B023
            print(f"| {tokens} | projection 2048->{width}, vLLM batch-invariant | {their_ms:.3f} | "
                  f"{plain_ms / their_ms:.2f} | |")  # fmt: skip
        call = lambda: router_gemm.aligned_linear(x, w)  # noqa: E731, B023
        tile_set_rows(tokens, f"projection 2048->{width}", tile_sets, use_projection_tiles, call, plain_ms)


def vllm_batch_invariant_linear() -> Callable | None:
    """vLLM's `linear_batch_invariant` (`model_executor.layers` in 0.26, `model_executor.determinism` by 0.33)."""
    try:
        from common_kernels.model.engine_invariance import _vllm_batch_invariance

        return _vllm_batch_invariance().linear_batch_invariant
    except ImportError:
        return None


def error_from(theirs: Callable[[], torch.Tensor] | None) -> Callable[[torch.Tensor], str]:
    """The experts' rows' note: the relative RMS difference from vLLM's output, where vLLM is installed."""
    if theirs is None:
        return lambda got: "; "
    reference = theirs().float()
    return lambda got: f"{rel_rms_error(reference, got):.1e}; "


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
    parser.add_argument("--tiles", type=parse_tiles, nargs="+", default=[tiles for _, tiles in aligned.TILE_SCHEDULE])
    parser.add_argument(
        "--router-tiles",
        type=parse_tiles,
        nargs="+",
        default=[router_gemm.SPLIT_WEIGHT_DECODE_TILES, router_gemm.SPLIT_WEIGHT_TILES],
    )
    parser.add_argument(
        "--projection-tiles",
        type=parse_tiles,
        nargs="+",
        default=[router_gemm.TENSOR_CORE_DECODE_TILES, router_gemm.TENSOR_CORE_TILES],
        help="tile sets of the tensor-core GEMM for the projection rows (BLOCK_T,BLOCK_E,BLOCK_D)",
    )
    parser.add_argument("--projections", action="store_true", help="also time a linear layer's projections")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time each call replayed from a CUDA graph: device time only, as a served decode step runs",
    )
    args = parser.parse_args(argv)
    global _CUDA_GRAPH
    _CUDA_GRAPH = args.cuda_graph
    if not torch.cuda.is_available():
        raise SystemExit("bench_aligned_moe: needs a CUDA GPU")
    shipped = aligned.TILE_SCHEDULE
    shipped_router = router_gemm.SPLIT_WEIGHT_DECODE_TILES, router_gemm.SPLIT_WEIGHT_TILES
    shipped_projection = router_gemm.TENSOR_CORE_DECODE_TILES, router_gemm.TENSOR_CORE_TILES
    timing = "CUDA graph replays (device time)" if _CUDA_GRAPH else "eager (host set-up included)"
    print(f"{torch.cuda.get_device_name()}; Ring-mini experts {RING_MINI}; timing: {timing}")
    print("shipped experts: " + ", ".join(f"up to {most or 'any'} tokens {tiles}" for most, tiles in shipped))
    print(
        f"shipped router (bf16 activations, fp32 weight): {shipped_router[0]} up to "
        f"{router_gemm.SPLIT_WEIGHT_DECODE_MAX_ROWS} rows, else {shipped_router[1]}; projections (bf16 weight): "
        f"{shipped_projection[0]} up to {router_gemm.TENSOR_CORE_DECODE_MAX_ROWS} rows, else {shipped_projection[1]}"
    )
    print("| tokens | provider | ms | baseline / ours | rel. RMS vs vLLM; bits = first set |")
    print("|---:|---|---:|---:|---|")
    try:
        for tokens in args.tokens:
            t = inputs(tokens, torch.Generator().manual_seed(tokens))
            theirs = vllms(t)
            their_ms = time_ms(theirs) if theirs else None
            if theirs:
                print(f"| {tokens} | vLLM fused_experts | {their_ms:.3f} | | |")
            call = functools.partial(aligned.aligned_expert_outputs, t["x"], t["w13"], t["w2"], t["ids"], t["weights"])
            tile_set_rows(tokens, "aligned", args.tiles, use_expert_tiles, call, their_ms, error_from(theirs))
            shared_expert_rows(tokens, args.tiles, torch.Generator().manual_seed(tokens + 2))
            aligned.TILE_SCHEDULE = shipped
            merged_shared_rows(tokens, t, torch.Generator().manual_seed(tokens + 4))
            router_rows(tokens, args.router_tiles, torch.Generator().manual_seed(tokens + 1))
            if args.projections:
                projection_rows(tokens, args.projection_tiles, torch.Generator().manual_seed(tokens + 3))
    finally:
        router_gemm.TENSOR_CORE_DECODE_TILES, router_gemm.TENSOR_CORE_TILES = shipped_projection
        aligned.TILE_SCHEDULE = shipped
        router_gemm.SPLIT_WEIGHT_DECODE_TILES, router_gemm.SPLIT_WEIGHT_TILES = shipped_router


if __name__ == "__main__":
    main(sys.argv[1:])
