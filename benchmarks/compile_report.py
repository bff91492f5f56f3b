"""Compile the linear-attention kernels for Hopper (sm_90a) on a machine without a GPU, and report what
ptxas and Triton's pipeliner made of them: registers, spill bytes, shared memory, and whether the chunk
loop's loads became asynchronous copies (software pipelining).

    python -m benchmarks.compile_report [--dtype bf16 fp32] [--warps 4 8] [--block-v 64] [--chunk 64]

A spill or an unpipelined loop is a reason to measure, not a measurement: timings come from
`bench_linear_attn` on a GPU. The kernels are compiled as the launches specialise them: pointers and
strides divisible by 16 (the model's q/k/v views and the pool are), the Ring-mini shape (K = V = 128).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from common_kernels.ops.linear_attn import backward, prefill

STATE_POINTERS = {"pool", "start", "delta", "dstate", "gfut", "d_initial", "d_final", "rate"}
INDEX_POINTERS = {"cu_seqlens", "seg_seq", "seg_idx", "nseg", "seg_first", "slots"}
INPUT_POINTERS = {"q", "k", "v", "o", "do", "dq", "dout"}


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict, dict]:
    names = list(inspect.signature(fn.fn).parameters)
    types, hints = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            types[name] = "constexpr"
        elif name in INPUT_POINTERS:
            types[name] = f"*{dtype}"
        elif name in STATE_POINTERS:
            types[name] = "*fp32"
        elif name in INDEX_POINTERS:
            types[name] = "*i32"
        elif name == "fresh":
            types[name] = "*i8"
        elif name == "scale":
            types[name] = "fp32"
        else:
            types[name] = "i32"
        if types[name].startswith("*") or name.startswith("stride"):
            hints[(i,)] = [["tt.divisibility", 16]]
    annotated = {n for n, prm in inspect.signature(fn.fn).parameters.items() if "constexpr" in str(prm.annotation)}
    missing = sorted(annotated - constexprs.keys())
    assert not missing, f"{fn.fn.__name__}: no value for the constexpr parameters {missing}"
    return types, {(names.index(n),): v for n, v in constexprs.items() if n in names}, hints


def compile_report(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int = 2) -> dict:
    """Registers, spills and shared memory of `fn` compiled for sm_90a, and its pipelined-load count."""
    types, consts, hints = _signature(fn, dtype, constexprs)
    kernel = triton.compile(
        ASTSource(fn=fn, signature=types, constexprs=consts, attrs=hints),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        info = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx.name, "-o", os.devnull], capture_output=True, text=True)
    numbers = lambda pattern: [int(x) for x in re.findall(pattern, info.stderr)]  # noqa: E731
    return {
        "registers": max(numbers(r"Used (\d+) registers"), default=-1),
        "spill_stores": sum(numbers(r"(\d+) bytes spill stores")),
        "shared_bytes": kernel.metadata.shared,
        "async_loads": kernel.asm["ttgir"].count("async_copy_global_to_local"),
    }


def kernels(block_v: int, block_k: int, chunk: int = prefill.CHUNK, seg: int = 1024) -> list[tuple[str, object, dict]]:
    # F32_DOT is the interpreter's upcast only; a GPU build multiplies fp32 operands as TF32 (the default)
    shape = {"H": 16, "K": 128, "V": 128, "BT": chunk, "SEG": seg, "F32_DOT": False, "DOT_PRECISION": "tf32"}
    tiles_v, tiles_k = shape | {"BV": block_v}, shape | {"BK": block_k}
    one_launch = {"ONE_LAUNCH": True}
    forward = tiles_v | {"ONE_LAUNCH": False}
    return [
        ("prefill delta", prefill._segment_delta_kernel, tiles_v),
        ("prefill scan", prefill._segment_scan_kernel, shape | {"BE": prefill.SCAN_BLOCK}),
        ("prefill forward", prefill._segment_forward_kernel, forward),
        ("prefill forward one-launch", prefill._segment_forward_kernel, forward | one_launch),
        ("backward dstate", backward._segment_dstate_kernel, tiles_v),
        ("backward dscan", backward._segment_dscan_kernel, shape | {"BE": prefill.SCAN_BLOCK, "HAS_DFINAL": True}),
        ("backward dq", backward._segment_dq_kernel, tiles_k),
        ("backward dk", backward._segment_dkv_kernel, shape | {"BK": block_k, "BV": 128, "DK": True}),
        ("backward dv", backward._segment_dkv_kernel, shape | {"BK": 128, "BV": block_v, "DK": False}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--warps", nargs="+", type=int, default=[4])
    parser.add_argument("--block-v", type=int, default=64)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=prefill.CHUNK)
    args = parser.parse_args()
    print(f"{'kernel':<18} {'dtype':<5} {'warps':>5} {'regs':>5} {'spill B':>8} {'smem B':>7} {'async loads':>11}")
    for dtype in args.dtype:
        for warps in args.warps:
            for name, fn, constexprs in kernels(args.block_v, args.block_k, args.chunk):
                r = compile_report(fn, dtype, constexprs, warps)
                print(
                    f"{name:<18} {dtype:<5} {warps:>5} {r['registers']:>5} {r['spill_stores']:>8} "
                    f"{r['shared_bytes']:>7} {r['async_loads']:>11}"
                )


if __name__ == "__main__":
    main()
