"""Sweep the launch settings of our prefill and decode kernels on the local GPU; prints the best per shape.

python -m benchmarks.sweep_linear_attn
"""

from __future__ import annotations

import functools
import inspect
import itertools

import torch
import triton

from common_kernels import decay_rates, preset_config
from common_kernels.ops.linear_attn.decode import linear_attention_decode
from common_kernels.ops.linear_attn.prefill import CHUNK, _segment_size, linear_attention_prefill, target_programs
from common_kernels.ops.triton_settings import sm_count

from .bench_linear_attn import D, bench, fused_qkv, prefill_inputs


def sweep_prefill(lengths: list[int], H: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Every launch setting on one prefill shape; prints the four fastest and where the shipped default stands.

    fp32 runs the engines' layout (fp32 q/k, the GEMM's bf16 v) and keeps the plan's value tile (64), which the
    engines build once per step for every layer: only the chunk, warps, stages and program count vary."""
    x, T = prefill_inputs(lengths, H, dtype=dtype), sum(lengths)
    v = x.v.to(torch.bfloat16) if dtype == torch.float32 else x.v
    results, launch = [], inspect.signature(linear_attention_prefill).parameters
    default = (CHUNK, 64, launch["num_warps"].default, launch["num_stages"].default, target_programs(x.q.device))
    sms = sm_count(x.q.device)  # 2 (the default), 4 and 8 programs per SM
    tiles = [64] if dtype == torch.float32 else [32, 64, 128]
    configs = itertools.product([32, 64], tiles, [4, 8], [1, 2, 3], [n * sms for n in (2, 4, 8)])
    for bt, bv, warps, stages, target in configs:
        seg = _segment_size(T, H, D // bv, bt, target)
        run = functools.partial(
            linear_attention_prefill, x.q, x.k, v, x.rate, D**-0.5, x.cu, x.pool, x.slots, x.fresh, chunk_size=bt,
            segment_size=seg, block_v=bv, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        try:
            us, _ = bench(run, True)
        except Exception as e:  # noqa: BLE001 - out of resources for this config
            print(f"  BT{bt} BV{bv} w{warps} s{stages} t{target}: {type(e).__name__}")
            continue
        shipped = (bt, bv, warps, stages, target) == default
        results.append((us, f"BT{bt} BV{bv} w{warps} s{stages} target{target} (SEG {seg})" + " [default]" * shipped))
    results.sort()
    rank = next((i for i, (_, cfg) in enumerate(results) if cfg.endswith("[default]")), None)
    print(
        f"prefill {len(lengths)}x{lengths[0]} (T={T}) H{H} {dtype}: "
        + " | ".join(f"{us:.1f}us {cfg}" for us, cfg in results[:4])
        + ("" if rank is None else f" || default {results[rank][0]:.1f}us, rank {rank + 1} of {len(results)}"),
        flush=True,
    )


def sweep_decode(B: int, H: int) -> None:
    rate = decay_rates(preset_config("ring-mini-linear-2.0"), 18).cuda()[:H]
    sets = max(1, (64 << 20) // (B * H * D * D * 4))
    pool = torch.zeros(B * sets, H, D, D, device="cuda")
    slot_sets = [torch.arange(i * B, (i + 1) * B, device="cuda", dtype=torch.int32) for i in range(sets)]
    q, k, v = fused_qkv(B, H)
    results = []
    for bv, warps in itertools.product([16, 32, 64, 128], [1, 2, 4, 8]):
        step = functools.partial(linear_attention_decode, q, k, v, rate, D**-0.5, pool, block_v=bv, num_warps=warps)
        us, _ = bench(lambda step=step: [step(s) for s in slot_sets], True, sets)
        results.append((us, f"BV{bv} w{warps}"))
    results.sort()
    print(f"decode B{B} H{H}: " + " | ".join(f"{us:.2f}us {cfg}" for us, cfg in results[:4]))


def main(fp32_only: bool = False) -> None:
    """Every sweep, or with `fp32_only` the fp32 prefill alone (issue 11: the engines' fp32 q/k, whose launch
    settings are still the bf16 sweep's)."""
    print(f"device: {torch.cuda.get_device_name()} | triton {triton.__version__}")
    if not fp32_only:
        for B in (1, 8, 32, 128, 256):
            sweep_decode(B, 16)
        for lengths, H in (([4096], 16), ([32768], 16), ([1024] * 32, 16), ([131072], 16), ([4096], 8)):
            sweep_prefill(lengths, H)
    fp32_shapes = ([4096], [4096] * 2, [32768], [131072]) if fp32_only else ([4096], [16384])
    for lengths in fp32_shapes:  # the engines' fp32 q/k (TF32 products): a chat step's 4K and 2 x 4K, long input
        sweep_prefill(lengths, 16, torch.float32)


def check_config(bt: int, bv: int, warps: int, stages: int, target: int) -> None:
    """One prefill config on several shapes: float64 check where affordable, then time (run in a subprocess)."""
    from common_kernels.ops.linear_attn.naive import linear_attention_varlen
    from common_kernels.testing import rel_rms_error

    cells = []
    for lengths, H in (
        ([4096], 16),
        ([1000, 1, 0, 3000, 77], 16),
        ([32768], 16),
        ([1024] * 32, 16),
        ([131072], 16),
        ([4096] * 8, 16),
        ([65536] + [512] * 63, 16),
        ([4096], 8),
        ([32768], 8),
    ):
        x, T = prefill_inputs(lengths, H), sum(lengths)
        rate, cu, q, k, v = x.rate, x.cu, x.q, x.k, x.v
        seg = _segment_size(T, H, D // bv, bt, target)

        run = functools.partial(
            linear_attention_prefill, q, k, v, rate, D**-0.5, cu, x.pool, x.slots, x.fresh, chunk_size=bt,
            segment_size=seg, block_v=bv, num_warps=warps, num_stages=stages,
        )  # fmt: skip

        err = "-"
        if T <= 32768:
            o = run()
            torch.cuda.synchronize()
            ref, _ = linear_attention_varlen(q.double(), k.double(), v.double(), rate.double(), D**-0.5, cu.cpu())
            err = f"{rel_rms_error(ref, o):.1e}"
        us, _ = bench(run, True)
        cells.append(f"{len(lengths)}x{max(lengths)}/H{H} {us:.0f}us err {err}")
    print(f"BT{bt} BV{bv} w{warps} s{stages} t{target}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 6:  # one prefill config: BT BV warps stages target
        check_config(*(int(x) for x in sys.argv[1:]))
    else:
        main(fp32_only=sys.argv[1:] == ["--fp32"])
