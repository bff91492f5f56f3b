"""The offline compile report (benchmarks/compile_report.py) must keep compiling the real kernels for sm_90a."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def compile_in_a_subprocess(script: str, timeout_s: int) -> str:
    """`script`'s output, run where Triton compiles for the GPU: this test session runs Triton's interpreter, which
    replaces the kernels it would compile."""
    env = os.environ | {"TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_compile_report_compiles_the_prefill_kernels_for_hopper():
    stdout = compile_in_a_subprocess(
        "from benchmarks.compile_report import compile_report, kernels\n"
        "for name, fn, consts in kernels(64, 64):\n"
        "    if not name.startswith('prefill'):\n"
        "        continue\n"
        "    r = compile_report(fn, 'bf16', consts, 4)\n"
        "    print(name, r)\n"
        "    assert 0 < r['registers'] <= 255, r\n"
        "    if 'scan' not in name:\n"
        "        assert r['shared_bytes'] > 0 and r['async_loads'] > 0, r\n",
        timeout_s=600,
    )
    assert "prefill delta" in stdout and "prefill scan" in stdout
    assert "prefill forward" in stdout and "prefill forward one-launch" in stdout


def test_compile_report_compiles_aligned_modes_kernels_for_hopper():
    """Every kernel aligned mode launches (and the window form) compiles for sm_90a; the MoE, router, selection and
    slot-sum kernels without register spills (the window form spills about 2 KB: not yet tuned); the softmax
    attention without calls (its key loop divided int64 positions by the page size, 40 calls of a division routine,
    until positions became int32)."""
    stdout = compile_in_a_subprocess(
        "from benchmarks.compile_report import aligned_kernels, compile_report\n"
        "for name, fn, types, consts, warps, stages in aligned_kernels():\n"
        "    r = compile_report(fn, 'bf16', consts, warps, stages, types)\n"
        "    print(name, r)\n"
        "    assert 0 < r['registers'] <= 255, r\n"
        "    assert r['spill_stores'] == 0 or name.startswith('linear attention'), (name, r)\n"
        "    assert r['calls'] == 0 or not name.startswith('softmax attention'), (name, r)\n",
        timeout_s=900,
    )
    for name in ("experts 16x128x64 swapped", "router, split weight", "expert selection", "expert blocks, one launch"):
        assert name in stdout


def test_the_window_forms_prefill_and_one_token_kernels_make_the_same_fp32_multiplies_and_no_fused_ones():
    """With multiply-add contraction on, ptxas fused tf32x3's products into 108 FFMA in the prefill kernel and 76 in
    the one-token kernel, and a decode's bits differed from the prefill's on the GPU. Compiled as launched (no
    contraction), no kernel makes an FFMA, at TF32 and tf32x3, and the prefill's two passes (the state chain, the
    outputs) make the one-token kernel's FMUL count between them (the decode does both jobs for its row)."""
    stdout = compile_in_a_subprocess(
        "from benchmarks.compile_report import window_float_ops\n"
        "for precision in ('tf32', 'tf32x3'):\n"
        "    ops = window_float_ops(precision)\n"
        "    print(precision, ops)\n"
        "    states, outputs, decode = ops.values()\n"
        "    assert all(o['FFMA'] == 0 and o['FMUL'] > 0 for o in ops.values()), (precision, ops)\n"
        "    assert states['FMUL'] + outputs['FMUL'] == decode['FMUL'], (precision, ops)\n",
        timeout_s=600,
    )
    assert stdout.count("window decode") == 2
