"""Aligned mode's linear attention in windows on the absolute grid (`ops.linear_attn.windowed`, what aligned mode
runs) and token by token (`ops.linear_attn.aligned`, what it ran before), against the default prefill and decode
kernels, in one process on one GPU at Ring-mini's heads (16 of 128; fp32 q/k, bf16 v, as the engines pass them):
what each aligned form costs, prefill and decode.

    python -m benchmarks.bench_aligned_linear_attn [--prefill 1x8192 2x4096 64x256] [--decode 64]
        [--token-tiles 16,2 8,1 32,4] [--window-launch 32,4,1 32,8,1,4 32,8,1,1,64]

`--token-tiles BLOCK_V,WARPS` times the token-by-token kernel with each V-tile and warp count (one row each): a
single long prompt's tokens run one after another, so its prefill is bound by one token's latency, which these set.
Each set is its own order of sums (its own bits, the same on both sides of aligned mode), so the fastest can ship.
`--window-launch BLOCK_V,WARPS,STAGES[,TILES[,ROWS]]` times the window form likewise (one row each; a decode step
also through the one-token kernel, `linear_attention_windowed_decode`, which aligned mode serves decodes with, TILES
V-tiles a program; ROWS output rows a block, 16 shipped: if 64-row blocks keep the bits, a prefill could take them
while a decode keeps its 16).

Timing: the median of CUDA-graph replays (`bench_linear_attn.bench`), so a call's host-side launches and allocations
are not counted (before 2026-12-02 they were: `do_bench`); `eager` marks a call that cannot be captured. Ratios are
the default kernel's time over the aligned one's (below 1: aligned is slower).
"""

from __future__ import annotations

import argparse
import sys

import torch

from common_kernels.ops.linear_attn import aligned, windowed
from common_kernels.ops.linear_attn.aligned import linear_attention_aligned, linear_attention_aligned_decode
from common_kernels.ops.linear_attn.decode import linear_attention_decode
from common_kernels.ops.linear_attn.prefill import linear_attention_prefill
from common_kernels.ops.linear_attn.windowed import WINDOW, linear_attention_windowed, linear_attention_windowed_decode

from .bench_linear_attn import bench as median_us

HEADS, DIM = 16, 128
DEVICE = "cuda"
TOKEN_TILES = [(aligned.ALIGNED_BLOCK_V, aligned.ALIGNED_NUM_WARPS)]  # `--token-tiles`
WINDOW_LAUNCHES = [
    (
        windowed.WINDOWED_BLOCK_V,
        windowed.WINDOWED_LAUNCH["num_warps"],
        windowed.WINDOWED_LAUNCH["num_stages"],
        windowed.WINDOWED_DECODE_TILES,
        windowed.OUTPUT_ROWS,
    )
]


def parse_token_tiles(text: str) -> tuple[int, int]:
    """ "BLOCK_V,WARPS": a power of two of at least 8 and a warp count."""
    parts = text.split(",")
    ok = len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts)
    if not ok or int(parts[0]) < 8 or int(parts[0]) & (int(parts[0]) - 1):
        raise argparse.ArgumentTypeError(f"--token-tiles {text!r}: give BLOCK_V,WARPS, e.g. 16,2")
    return int(parts[0]), int(parts[1])


def parse_window_launch(text: str) -> tuple[int, ...]:
    """ "BLOCK_V,WARPS,STAGES[,TILES[,ROWS]]": TILES, V-tiles a decode program takes one after another (default 1);
    ROWS, a window's output rows per block (default the shipped `OUTPUT_ROWS`; 16 to 64, a power of two)."""
    parts = text.split(",")
    ok = len(parts) in (3, 4, 5) and all(p.isdigit() and int(p) > 0 for p in parts)
    rows = int(parts[4]) if ok and len(parts) == 5 else windowed.OUTPUT_ROWS
    if not ok or rows not in (16, 32, 64):
        raise argparse.ArgumentTypeError(
            f"--window-launch {text!r}: give BLOCK_V,WARPS,STAGES[,TILES[,ROWS]], e.g. 32,4,1 or 32,8,1,1,64"
        )
    numbers = [int(p) for p in parts[:4]]
    return (*numbers, *([1] if len(numbers) == 3 else []), rows)


def window_form(call, label: str = "aligned, windows") -> dict:
    """The window-form call once per `WINDOW_LAUNCHES` set (the prefill's and the one-token kernel's launch)."""

    def with_launch(block_v: int, warps: int, stages: int, tiles: int, rows: int):
        def run():
            windowed.WINDOWED_BLOCK_V, windowed.WINDOWED_DECODE_TILES, windowed.OUTPUT_ROWS = block_v, tiles, rows
            launch = {**windowed.WINDOWED_LAUNCH, "num_warps": warps, "num_stages": stages}  # its other options kept
            windowed.WINDOWED_LAUNCH = windowed.WINDOWED_DECODE_LAUNCH = launch
            return call()

        return run

    def name(bv: int, w: int, st: int, tiles: int, rows: int) -> str:
        extra = (f", {tiles} tiles a program" if tiles > 1 else "") + (f", {rows}-row blocks" if rows != 16 else "")
        return f"{label}, V-tile {bv}, {w} warps, {st} stages" + extra

    return {name(*launch): with_launch(*launch) for launch in WINDOW_LAUNCHES}


def token_by_token(call) -> dict:
    """The token-by-token call once per `TOKEN_TILES` set, each run with its V-tile and warps."""

    def with_tiles(block_v: int, warps: int):
        def run():
            aligned.ALIGNED_BLOCK_V, aligned.ALIGNED_NUM_WARPS = block_v, warps
            return call()

        return run

    return {f"aligned, token by token, V-tile {bv}, {w} warps": with_tiles(bv, w) for bv, w in TOKEN_TILES}


def parse_shape(text: str) -> tuple[int, int]:
    """ "BxL": B sequences of L tokens."""
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--prefill {text!r}: give BxL, e.g. 2x4096")
    return int(parts[0]), int(parts[1])


def tensors(tokens: int, sequences: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    return {
        "q": (torch.randn(tokens, HEADS, DIM, generator=g) * 0.1).to(DEVICE),
        "k": (torch.randn(tokens, HEADS, DIM, generator=g) * 0.1).to(DEVICE),
        "v": torch.randn(tokens, HEADS, DIM, generator=g).bfloat16().to(DEVICE),
        "rate": torch.linspace(0.01, 0.8, HEADS).to(DEVICE),
        "pool": torch.zeros(sequences, HEADS, DIM, DIM, device=DEVICE),
        "window_k": torch.zeros(sequences, HEADS, WINDOW, DIM, device=DEVICE),
        "window_v": torch.zeros(sequences, HEADS, WINDOW, DIM, device=DEVICE),
        "slots": torch.arange(sequences, device=DEVICE),
    }


def prefill_row(sequences: int, length: int) -> None:
    t = tensors(sequences * length, sequences)
    cu = torch.arange(0, (sequences + 1) * length, length, dtype=torch.int32, device=DEVICE)
    fresh = torch.ones(sequences, dtype=torch.int8, device=DEVICE)
    starts = torch.zeros(sequences, dtype=torch.long, device=DEVICE)
    qkv = (t["q"], t["k"], t["v"], t["rate"], DIM**-0.5)
    calls = {
        "default prefill": lambda: linear_attention_prefill(*qkv, cu, t["pool"], t["slots"], fresh),
        **token_by_token(lambda: linear_attention_aligned(*qkv, cu, t["pool"], t["slots"], fresh)),
        **window_form(
            lambda: linear_attention_windowed(
                *qkv, cu, starts, t["pool"], t["window_k"], t["window_v"], t["slots"], fresh
            )
        ),
    }
    report(f"prefill {sequences}x{length}", calls)


def decode_row(sequences: int) -> None:
    """One token per sequence at position `WINDOW * 62 + 31` (mid-window, as most decode steps are)."""
    t = tensors(sequences, sequences)
    fresh = torch.zeros(sequences, dtype=torch.int8, device=DEVICE)
    cu = torch.arange(sequences + 1, dtype=torch.int32, device=DEVICE)
    starts = torch.full((sequences,), WINDOW * 62 + 31, dtype=torch.long, device=DEVICE)
    qkv = (t["q"], t["k"], t["v"], t["rate"], DIM**-0.5)
    calls = {
        "default decode": lambda: linear_attention_decode(*qkv, t["pool"], t["slots"], fresh=fresh),
        **token_by_token(lambda: linear_attention_aligned_decode(*qkv, t["pool"], t["slots"], fresh)),
        **window_form(
            lambda: linear_attention_windowed(
                *qkv, cu, starts, t["pool"], t["window_k"], t["window_v"], t["slots"], fresh
            )
        ),
        **window_form(
            lambda: linear_attention_windowed_decode(
                *qkv, starts, t["pool"], t["window_k"], t["window_v"], t["slots"], fresh
            ),
            label="aligned, windows, one-token kernel",
        ),
    }
    report(f"decode {sequences} sequences", calls)


def report(case: str, calls: dict) -> None:
    """Each call's time against the first's; a window-form launch's output also against the first window form's."""
    baseline = first_window = None
    for name, call in calls.items():
        us, timing = median_us(call, graph=True)
        ms = us / 1e3
        baseline = baseline or ms
        note = ""
        if name.startswith("aligned, windows"):
            out = call().clone()
            first_window = out if first_window is None else first_window
            note = f" bits = first window form's: {torch.equal(out, first_window)}"
        print(f"| {case} | {name} | {ms:.3f} | {baseline / ms:.2f} | {timing} |{note}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=parse_shape, nargs="+", default=[(1, 8192), (2, 4096), (64, 256)])
    parser.add_argument("--decode", type=int, nargs="+", default=[64])
    parser.add_argument("--token-tiles", type=parse_token_tiles, nargs="+", default=list(TOKEN_TILES))
    parser.add_argument("--window-launch", type=parse_window_launch, nargs="+", default=list(WINDOW_LAUNCHES))
    args = parser.parse_args(argv)
    TOKEN_TILES[:] = args.token_tiles
    WINDOW_LAUNCHES[:] = args.window_launch
    if not torch.cuda.is_available():
        raise SystemExit("bench_aligned_linear_attn: needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}; {HEADS} heads of {DIM}, fp32 q/k, bf16 v")
    print("| case | kernel | ms | default / this | timing |")
    print("|---|---|---:|---:|---|")
    shipped = aligned.ALIGNED_BLOCK_V, aligned.ALIGNED_NUM_WARPS
    shipped_window = (
        windowed.WINDOWED_BLOCK_V, windowed.WINDOWED_LAUNCH, windowed.WINDOWED_DECODE_LAUNCH,
        windowed.WINDOWED_DECODE_TILES,
    )  # fmt: skip
    try:
        for sequences, length in args.prefill:
            prefill_row(sequences, length)
        for sequences in args.decode:
            decode_row(sequences)
    finally:
        aligned.ALIGNED_BLOCK_V, aligned.ALIGNED_NUM_WARPS = shipped
        (
            windowed.WINDOWED_BLOCK_V, windowed.WINDOWED_LAUNCH, windowed.WINDOWED_DECODE_LAUNCH,
            windowed.WINDOWED_DECODE_TILES,
        ) = shipped_window  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
