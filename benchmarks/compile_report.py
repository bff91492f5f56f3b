"""Compile the linear-attention kernels (or, with `--aligned`, aligned mode's MoE, router, selection and window
kernels) for Hopper (sm_90a) on a machine without a GPU, and report what ptxas and Triton's pipeliner made of them:
registers, spill bytes, shared memory, and whether the chunk loop's loads became asynchronous copies (software
pipelining). A kernel that fails to compile for the GPU fails here, before any device time is spent on it.

    python -m benchmarks.compile_report [--dtype bf16 fp32] [--warps 4 8] [--block-v 64] [--chunk 64] [--aligned]

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

from common_kernels.ops import triton_settings
from common_kernels.ops.attention import aligned as attn
from common_kernels.ops.linear_attn import backward, prefill, windowed
from common_kernels.ops.moe import aligned, router_gemm, select

STATE_POINTERS = {"pool", "start", "delta", "dstate", "gfut", "d_initial", "d_final", "rate"}
INDEX_POINTERS = {"cu_seqlens", "seg_seq", "seg_idx", "nseg", "seg_first", "slots"}
INPUT_POINTERS = {"q", "k", "v", "o", "do", "dq", "dout"}


def _signature(fn, dtype: str, constexprs: dict, given: dict) -> tuple[dict, dict, dict]:
    names = list(inspect.signature(fn.fn).parameters)
    types, hints = {}, {}
    for i, name in enumerate(names):
        if name in given:
            types[name] = given[name]
        elif name in constexprs:
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


def compile_report(
    fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int = 2, types: dict | None = None, **options
) -> dict:
    """Registers, spills and shared memory of `fn` compiled for sm_90a, its pipelined-load count, its fp32
    multiply, add and fused multiply-add instructions in the machine code (SASS), and its calls to routines.
    `types`: the parameters' types where the guess by name (the linear-attention kernels' names) does not fit;
    `options`: other compile options (a launch's, e.g. `enable_fp_fusion`)."""
    types, consts, hints = _signature(fn, dtype, constexprs, types or {})
    kernel = triton.compile(
        ASTSource(fn=fn, signature=types, constexprs=consts, attrs=hints),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, **options},
    )
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as folder:
        ptx, cubin = os.path.join(folder, "kernel.ptx"), os.path.join(folder, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = [f"{tools}/ptxas", "-v", "-arch=sm_90a", ptx, "-o", cubin]
        info = subprocess.run(ptxas, capture_output=True, text=True)
        sass = subprocess.run([f"{tools}/cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    numbers = lambda pattern: [int(x) for x in re.findall(pattern, info.stderr)]  # noqa: E731
    return {
        "registers": max(numbers(r"Used (\d+) registers"), default=-1),
        "spill_stores": sum(numbers(r"(\d+) bytes spill stores")),
        "shared_bytes": kernel.metadata.shared,
        "async_loads": kernel.asm["ttgir"].count("async_copy_global_to_local"),
        "float_ops": {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("FMUL", "FADD", "FFMA")},
        "calls": len(re.findall(r"\bCALL\b", sass)),  # called routines, e.g. an int64 division's
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


def aligned_kernels() -> list[tuple[str, object, dict, dict, int, int]]:
    """(name, kernel, parameter types, constexprs, warps, stages) of aligned mode's kernels at Ring-mini's shapes,
    in the launches' tile sets (the experts' decode and prefill sets, and the transposed decode set)."""
    moe = {
        "a": "*bf16",
        "w": "*bf16",
        "w_last": "*bf16",
        "out": "*bf16",
        "pair_of_row": "*i64",
        "expert_of_block": "*i64",
    }
    gemm = {"GATHER": True, "SWIGLU": True, "IEEE": False, "INTERPRET": False, "EVEN_K": True, "EVEN_N": True}
    gemm["LAST_APART"] = True  # the shared expert in the routed experts' launch, as Ring-mini's layers run it
    found = []
    for tiles in [aligned.ExpertTiles(16, 128, 64, swap_ab=True)] + [t for _, t in aligned.TILE_SCHEDULE]:
        blocks = {
            "BLOCK_M": tiles.block_m,
            "BLOCK_N": tiles.block_n,
            "BLOCK_K": tiles.block_k,
            "SWAP_AB": tiles.swap_ab,
        }
        name = "experts " + "x".join(map(str, tiles[:3])) + (" swapped" if tiles.swap_ab else "")
        found.append((name, aligned._expert_gemm_kernel, moe, gemm | blocks, tiles.num_warps, tiles.num_stages))
    router = {"x": "*bf16", "w": "*fp32", "y": "*fp32"}
    split = dict(zip(("BLOCK_T", "BLOCK_E", "BLOCK_D"), router_gemm.SPLIT_WEIGHT_DECODE_TILES, strict=True))
    flags = {"TENSOR_CORES": False, "SPLIT_WEIGHT": True, "INTERPRET": False, "EVEN_D": True}
    window = {
        "q": "*fp32", "k": "*fp32", "v": "*bf16", "o": "*fp32", "pool": "*fp32", "window_k": "*fp32",
        "window_v": "*fp32", "slots": "*i64", "fresh": "*i8", "starts": "*i64", "cu_seqlens": "*i32",
        "rate": "*fp32", "scale": "fp32",
    }  # fmt: skip
    scratch = {"window_states": "*fp32", "first_window": "*i32"}
    states = {name: kind for name, kind in window.items() if name not in ("q", "o", "scale")} | scratch
    outputs = {name: kind for name, kind in window.items() if name not in ("pool", "fresh")} | scratch
    outputs["num_sequences"] = "i32"
    window_shape = {"K": 128, "V": 128, "BV": windowed.WINDOWED_BLOCK_V, "C": windowed.WINDOW}
    window_shape["ROWS"] = windowed.OUTPUT_ROWS
    selection = {"logits": "*fp32", "bias": "*fp32", "ids": "*i64", "weights": "*fp32", "scale": "fp32", "k": "i32"}
    indices = dict.fromkeys(("cu_seqlens_q", "seq_lens", "kv_start", "block_table", "table_rows"), "*i32")
    partials = {"part_m": "*fp32", "part_l": "*fp32", "part_acc": "*fp32"}
    attention = indices | partials | {"q": "*bf16", "k": "*bf16", "v": "*bf16", "o": "*bf16", "scale": "fp32"}
    ring_mini_heads = {"HEADS": 4, "D": 128, "BLOCK_M": attn.BLOCK_M, "SPLIT": attn.SPLIT}
    attention_flags = {"GROUP": 4, "PAGED": True, "ROW_INDEX": False, "DOT": "tf32", "INTERPRET": False}
    attention_flags["TILE_IN_PAGE"] = True  # vLLM's pages (multiples of 16 tokens; 1,024 for Ring-mini)
    tiles = ("BLOCK_T", "BLOCK_E", "BLOCK_D")
    tensor_cores = {"TENSOR_CORES": True, "SPLIT_WEIGHT": False, "INTERPRET": False, "EVEN_D": True}
    bf16_gemm = {"x": "*bf16", "w": "*bf16", "y": "*fp32"}
    projections = [
        (f"projection {'x'.join(map(str, t))}", router_gemm._invariant_router_kernel, bf16_gemm,
         dict(zip(tiles, t, strict=True)) | tensor_cores, 4, 3)
        for t in (router_gemm.TENSOR_CORE_DECODE_TILES, router_gemm.TENSOR_CORE_TILES)
    ]  # fmt: skip
    return found + projections + [
        ("router, split weight", router_gemm._invariant_router_kernel, router, split | flags, 4, 3),
        ("expert selection", select._select_experts_kernel, selection,
         {"HAS_BIAS": True, "NORMALISE": True, "BLOCK_E": 256, "BLOCK_G": 8, "BLOCK_K": 8, "SHARED_SLOT": True},
         4, 1),
        ("expert blocks, one launch", aligned._block_layout_kernel,
         {"topk_ids": "*i64", "pair_of_row": "*i64", "expert_of_block": "*i64"},
         {"BLOCK_E": 512, "BLOCK_M": 16, "CHUNK": aligned._LAYOUT_CHUNK,  # 256 routed + the shared
          "MAX_PAIRS": aligned.ONE_LAUNCH_MAX_PAIRS}, 4, 1),
        ("slot sum", aligned._combine_slots_kernel, {"y": "*fp32", "weights": "*fp32", "out": "*fp32", "k": "i32"},
         {"BLOCK_D": aligned.COMBINE_BLOCK_D}, 4, 1),
        ("softmax attention, paged", attn._aligned_attention_kernel, attention,
         ring_mini_heads | attention_flags | {"BLOCK_N": attn.BLOCK_N}, 4, 3),
        ("softmax attention, join", attn._join_splits_kernel, partials | indices | {"o": "*bf16"}, ring_mini_heads,
         4, 3),
        ("linear attention, window states", windowed._window_states_kernel, states,
         {name: window_shape[name] for name in ("K", "V", "BV", "C")}
         | {"DOT_PRECISION": triton_settings.FP32_DOT_PRECISION},
         *_warps_stages(windowed.WINDOWED_LAUNCH)),
        ("linear attention, window outputs", windowed._window_outputs_kernel, outputs,
         window_shape | {"DOT_PRECISION": triton_settings.FP32_DOT_PRECISION},
         *_warps_stages(windowed.WINDOWED_LAUNCH)),
        ("linear attention, window buffer", windowed._window_buffer_kernel,
         {"k": "*fp32", "v": "*bf16", "window_k": "*fp32", "window_v": "*fp32", "slots": "*i64", "starts": "*i64",
          "cu_seqlens": "*i32"},
         {"K": 128, "V": 128, "C": windowed.WINDOW}, 4, 1),
        ("linear attention, window decode", windowed._windowed_decode_kernel,
         {name: kind for name, kind in window.items() if name != "cu_seqlens"},
         window_shape | {"DOT_PRECISION": triton_settings.FP32_DOT_PRECISION, "TILES": windowed.WINDOWED_DECODE_TILES},
         *_warps_stages(windowed.WINDOWED_DECODE_LAUNCH)),
    ]  # fmt: skip


def window_float_ops(precision: str) -> dict[str, dict]:
    """The window form's prefill (state and output passes) and one-token kernels' fp32 instructions at `precision`
    (`tl.dot`'s), compiled with their launches' options. Prefill and decode must give the same bits; a multiply-add
    the compiler fuses in one and not the other breaks that, so no fused ones and the same multiplies are the offline
    part of the check (the GPU test the rest)."""
    prefill = (windowed._window_states_kernel, windowed._window_outputs_kernel)
    launches = dict.fromkeys(prefill, windowed.WINDOWED_LAUNCH)
    launches[windowed._windowed_decode_kernel] = windowed.WINDOWED_DECODE_LAUNCH
    return {
        name: compile_report(fn, "fp32", consts | {"DOT_PRECISION": precision}, types=types, **launches[fn])[
            "float_ops"
        ]
        for name, fn, types, consts, _, _ in aligned_kernels()
        if fn in launches
    }


def _warps_stages(launch: dict) -> tuple[int, int]:
    """A launch's warps and stages (the window kernels' other option, no multiply-add contraction, leaves their
    TF32 SASS as it is)."""
    return launch["num_warps"], launch["num_stages"]


HOPPER_MAX_SHARED = 232448  # bytes a block may use on sm_90; more compiles but fails to launch


def _shared(report: dict) -> str:
    over = " (over Hopper's 227 KiB: will not launch)" if report["shared_bytes"] > HOPPER_MAX_SHARED else ""
    return f"{report['shared_bytes']:>7} {report['async_loads']:>11}{over}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--warps", nargs="+", type=int, default=[4])
    parser.add_argument("--block-v", type=int, default=64)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=prefill.CHUNK)
    parser.add_argument("--aligned", action="store_true", help="aligned mode's kernels instead")
    args = parser.parse_args()
    width = 26 if args.aligned else 18
    print(f"{'kernel':<{width}} {'dtype':<5} {'warps':>5} {'regs':>5} {'spill B':>8} {'smem B':>7} {'async loads':>11}")
    if args.aligned:
        for name, fn, types, constexprs, warps, stages in aligned_kernels():
            r = compile_report(fn, "bf16", constexprs, warps, stages, types)
            print(f"{name:<{width}} {'-':<5} {warps:>5} {r['registers']:>5} {r['spill_stores']:>8} {_shared(r)}")
        return
    for dtype in args.dtype:
        for warps in args.warps:
            for name, fn, constexprs in kernels(args.block_v, args.block_k, args.chunk):
                r = compile_report(fn, dtype, constexprs, warps)
                print(f"{name:<18} {dtype:<5} {warps:>5} {r['registers']:>5} {r['spill_stores']:>8} {_shared(r)}")


if __name__ == "__main__":
    main()
