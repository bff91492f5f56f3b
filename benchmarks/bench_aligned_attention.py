"""Aligned mode's softmax attention in a decode step against vLLM's FlashAttention, in one process on one GPU, at
Ring-mini's softmax layers (16 query heads over 4 KV heads of 128, bf16, 512-token pages): what a long context's
decode costs aligned, and what splitting its keys over programs buys.

    python -m benchmarks.bench_aligned_attention [--batch 1 8 64] [--context 4096 16384] [--page 512]
        [--variants BLOCK_N,SPLIT,WARPS,STAGES[,BLOCK_M] ...] [--prefill 8192]

Rows: ours with the keys split over programs and joined (`decode_splits`, the shipped decode path), ours with one
program walking every split (the prefill's path, forced), and vLLM's `flash_attn_varlen_func` (FA3 on Hopper) over
the same paged cache. Timing: `triton.testing.do_bench_cudagraph` (median device time, as a served decode step under
CUDA graphs pays it); KV GB/s counts the keys and values read once. Each of our rows also says whether its output is
bit-equal to the other path's (they must be: that is aligned mode's contract), and FlashAttention's row its largest
difference from ours (two kernels, two roundings).

`--variants` times other tiles and launches of the same kernel beside the shipped ones. Warps and stages leave a
row's bits alone; another key tile (`BLOCK_N`) or split (`SPLIT`) is another order of sums, so other bits: a change
aligned mode may make, engine and shim together (each row says whether its bits are the shipped settings'). A query
tile of more rows (`BLOCK_M`, e.g. 64: 16 queries x 4 heads) should keep them (a row's sums read only its own query
row), which is what would let a prefill read its keys once per 16 queries instead of once per 4: the rows say.
`--prefill N` adds one N-token prompt through the shim's packed call (one program walking every split), per setting.
`--page` sets the cache's page size: vLLM serves Ring-mini in 1,024-token blocks, SGLang in one-token pages; a page
that is not a multiple of the 64-key tile takes the kernel's other variant (a page id per key, not per tile).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
import triton

from common_kernels.ops.attention import aligned

HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 4, 128, 512
DEVICE = "cuda"


def decode_inputs(batch: int, context: int, generator: torch.Generator) -> dict:
    """One query per sequence at position `context - 1`, its keys over shuffled pages of a bf16 paged cache."""
    pages = triton.cdiv(context, PAGE)
    total = batch * pages
    shape = (total, PAGE, KV_HEADS, HEAD_DIM)
    tensors = {
        "q": torch.randn(batch, HEADS, HEAD_DIM, generator=generator).bfloat16(),
        "k": torch.randn(shape, generator=generator).bfloat16(),
        "v": torch.randn(shape, generator=generator).bfloat16(),
        "table": torch.randperm(total, generator=generator).view(batch, pages).int(),
        "cu_q": torch.arange(batch + 1, dtype=torch.int32),
        "seq_lens": torch.full((batch,), context, dtype=torch.int32),
    }
    return {name: t.to(DEVICE) for name, t in tensors.items()}


VARIANTS: list[tuple[int, ...]] = []  # `--variants`


def parse_variant(text: str) -> tuple[int, ...]:
    """ "BLOCK_N,SPLIT,WARPS,STAGES[,BLOCK_M]": power-of-two tiles of at least 16, a split that is a multiple of the
    key tile; BLOCK_M defaults to the shipped one."""
    parts = text.split(",")
    ok = len(parts) in (4, 5) and all(p.isdigit() and int(p) > 0 for p in parts)
    numbers = [int(p) for p in parts] if ok else [0, 0]
    block_n, split = numbers[:2]
    tiles = [block_n] + numbers[4:]
    if not ok or any(t < 16 or t & (t - 1) for t in tiles) or split % block_n:
        raise argparse.ArgumentTypeError(
            f"--variants {text!r}: give BLOCK_N,SPLIT,WARPS,STAGES[,BLOCK_M], e.g. 128,1024,4,3 or 64,1024,4,3,64"
        )
    return tuple(numbers) if len(numbers) == 5 else (*numbers, aligned.BLOCK_M)


@contextlib.contextmanager
def settings(block_n: int, split: int, warps: int, stages: int, block_m: int) -> Iterator[None]:
    """The kernel's tiles, split and launch set to these for the block, then put back."""
    saved = aligned.BLOCK_N, aligned.SPLIT, aligned._LAUNCH, aligned.BLOCK_M
    aligned.BLOCK_N, aligned.SPLIT, aligned.BLOCK_M = block_n, split, block_m
    aligned._LAUNCH = {**saved[2], "num_warps": warps, "num_stages": stages}
    try:
        yield
    finally:
        aligned.BLOCK_N, aligned.SPLIT, aligned._LAUNCH, aligned.BLOCK_M = saved


def variant_label(block_n: int, split: int, warps: int, stages: int, block_m: int) -> str:
    return f"{block_m}-row query tiles, {block_n}-key tiles, {split}-key splits, {warps} warps, {stages} stages"


def each_variant(call: Callable[[], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, float]]:
    """Each `--variants` setting's label, `call`'s output and its time under that setting."""
    for variant in VARIANTS:
        with settings(*variant):
            yield variant_label(*variant), call(), triton.testing.do_bench_cudagraph(call, return_mode="median")


def ours(t: dict) -> Callable[[], torch.Tensor]:
    scale = HEAD_DIM**-0.5
    return lambda: aligned.paged_attention_aligned(
        t["q"], t["k"], t["v"], t["cu_q"], t["seq_lens"], t["table"], scale, 1
    )


def flash_attention(t: dict, context: int) -> Callable[[], torch.Tensor] | None:
    """vLLM's FlashAttention decode over the same cache, in the version vLLM picks for this GPU (FA3 on Hopper, whose
    build has no FA2 varlen op), or None where vLLM's build of it is absent."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    version = get_flash_attn_version(head_size=HEAD_DIM)
    return lambda: flash_attn_varlen_func(
        t["q"], t["k"], t["v"], max_seqlen_q=1, cu_seqlens_q=t["cu_q"], max_seqlen_k=context,
        seqused_k=t["seq_lens"], softmax_scale=HEAD_DIM**-0.5, causal=True, block_table=t["table"],
        **({} if version is None else {"fa_version": version}),
    )  # fmt: skip


def row(batch: int, context: int, label: str, ms: float, note: str, bandwidth: bool = True) -> None:
    """A table row; KV GB/s counts the keys and values read once (a decode's; a prefill's query tiles read them
    again and again: no figure)."""
    gb = 2 * batch * context * KV_HEADS * HEAD_DIM * 2 / 1e9  # keys and values, bf16
    rate = f"{gb / ms * 1e3:,.0f}" if bandwidth else "-"
    print(f"| {batch} | {context:,} | {label} | {ms:.3f} | {rate} | {note} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    global PAGE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--variants", type=parse_variant, nargs="+", default=[])
    parser.add_argument("--prefill", type=int, nargs="+", default=[])
    parser.add_argument("--page", type=int, default=PAGE, help="tokens a page of the cache")
    args = parser.parse_args(argv)
    VARIANTS[:] = args.variants
    PAGE = args.page
    if not torch.cuda.is_available():
        raise SystemExit("bench_aligned_attention: needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}; {HEADS} query heads over {KV_HEADS} KV heads of {HEAD_DIM}, bf16, "
          f"{PAGE}-token pages; {aligned.SPLIT}-key splits")  # fmt: skip
    print("| batch | context | provider | ms | KV GB/s | note |")
    print("|---:|---:|---|---:|---:|---|")
    for context in args.context:
        for batch in args.batch:
            decode_rows(batch, context)
    for length in args.prefill:
        prefill_rows(length)


def decode_rows(batch: int, context: int) -> None:
    """The rows of one batch and context: ours split, ours in one program, FlashAttention's where vLLM is."""
    t = decode_inputs(batch, context, torch.Generator().manual_seed(batch * 7 + context))
    call = ours(t)
    shipped = aligned.SPLIT_BELOW_PROGRAMS_PER_SM
    ships_split = aligned.decode_splits(t["table"], PAGE, batch * KV_HEADS, 1) > 0
    try:
        aligned.SPLIT_BELOW_PROGRAMS_PER_SM = 1 << 20  # split whatever the batch
        splits = aligned.decode_splits(t["table"], PAGE, batch * KV_HEADS, 1)
        split_out, split_ms = call(), triton.testing.do_bench_cudagraph(call, return_mode="median")
        aligned.SPLIT_BELOW_PROGRAMS_PER_SM = 0
        whole_out, whole_ms = call(), triton.testing.do_bench_cudagraph(call, return_mode="median")
    finally:
        aligned.SPLIT_BELOW_PROGRAMS_PER_SM = shipped
    label = f"aligned, keys split ({splits} splits a sequence){' (shipped)' if ships_split else ''}"
    row(batch, context, label, split_ms, f"bits = one program's: {torch.equal(split_out, whole_out)}")
    label = f"aligned, one program a sequence{'' if ships_split else ' (shipped)'}"
    row(batch, context, label, whole_ms, f"{whole_ms / split_ms:.2f}x the split's time")
    for label, out, ms in each_variant(call):
        note = f"{split_ms / ms:.2f}x the shipped split's speed; bits = shipped's: {torch.equal(out, split_out)}"
        row(batch, context, f"aligned, keys split, {label}", ms, note)
    theirs = flash_attention(t, context)
    if theirs is not None:
        diff = (theirs().float() - split_out.float()).abs().max().item()
        fa_ms = triton.testing.do_bench_cudagraph(theirs, return_mode="median")
        note = f"ours (split) / FA: {split_ms / fa_ms:.2f}x; max diff {diff:.1e}"
        row(batch, context, "vLLM flash_attn_varlen_func", fa_ms, note)


def prefill_rows(length: int) -> None:
    """One `length`-token prompt through the shim's packed call (what an engine's prefill chunk runs too, over
    pages), with the shipped settings and each variant."""
    g = torch.Generator().manual_seed(length)
    q = torch.randn(length, HEADS, HEAD_DIM, generator=g).bfloat16().to(DEVICE)
    k, v = (torch.randn(length, KV_HEADS, HEAD_DIM, generator=g).bfloat16().to(DEVICE) for _ in range(2))
    cu = torch.tensor([0, length], dtype=torch.int32, device=DEVICE)

    def call():
        return aligned.causal_attention_aligned(q, k, v, cu, HEAD_DIM**-0.5, length)

    shipped_out, shipped_ms = call(), triton.testing.do_bench_cudagraph(call, return_mode="median")
    row(1, length, "aligned prefill (one prompt)", shipped_ms, "shipped settings", bandwidth=False)
    for label, out, ms in each_variant(call):
        note = f"{shipped_ms / ms:.2f}x the shipped speed; bits = shipped's: {torch.equal(out, shipped_out)}"
        row(1, length, f"aligned prefill, {label}", ms, note, bandwidth=False)


if __name__ == "__main__":
    main(sys.argv[1:])
