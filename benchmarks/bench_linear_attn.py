"""Linear-attention kernels side by side, in one process, on the same inputs and the same fp32 state pool.

Providers: ours (`common_kernels`), fla-core (`chunk_simple_gla` / `fused_recurrent_simple_gla` with
`g_gamma`), SGLang `seg_la_fwd` and vLLM `lightning_attention` / `linear_decode_forward_triton`. The two
engine files are loaded straight from their packages' sources (`--ext-dir` holds `seg_la.py` and
`lightning_attn.py` as shipped in sglang 0.5.17 / vllm 0.26.0; vLLM's three imports are shimmed) so
neither engine needs installing. A provider that is missing is reported as such.

Timing: CUDA-graph replay (median) where the call can be captured, else CUDA events around eager calls
(`eager` in the table). Decode captures several calls on distinct slot sets so the state working set is
larger than L2. Bandwidth uses the minimum-bytes model: bf16 q/k/v/o plus fp32 state read and write.

    python -m benchmarks.bench_linear_attn --ext-dir .bench-ext [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from common_kernels import decay_rates, preset_config
from common_kernels.ops.linear_attn.decode import linear_attention_decode
from common_kernels.ops.linear_attn.naive import linear_attention_varlen
from common_kernels.ops.linear_attn.prefill import linear_attention_prefill
from common_kernels.testing import rel_rms_error

D = 128
L2_BYTES = 64 << 20


@dataclass
class Row:
    case: str
    provider: str
    us: float
    gbps: float
    pct_copy: float
    timing: str
    err: float | None = None
    ratio_vs_best_other: float | None = None


def load_ext(ext_dir: Path) -> dict[str, types.ModuleType]:
    mods = {}
    seg = ext_dir / "seg_la.py"
    if seg.exists():
        spec = importlib.util.spec_from_file_location("ext_seg_la", seg)
        mods["sglang"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods["sglang"])
    light = ext_dir / "lightning_attn.py"
    if light.exists():
        import triton.language as tl

        shims = {
            "vllm": types.ModuleType("vllm"),
            "vllm.platforms": types.SimpleNamespace(current_platform=types.SimpleNamespace(is_cuda=lambda: True)),
            "vllm.triton_utils": types.SimpleNamespace(tl=tl, triton=triton),
            "vllm.v1.attention.backends.utils": types.SimpleNamespace(PAD_SLOT_ID=-1),
        }
        saved = {name: sys.modules.get(name) for name in shims}
        sys.modules.update(shims)
        spec = importlib.util.spec_from_file_location("ext_lightning_attn", light)
        mods["vllm"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods["vllm"])
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name)
    return mods


def bench(fn, graph: bool, calls_per_fn: int = 1) -> tuple[float, str]:
    """Median microseconds per call."""
    if graph:
        try:
            ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
            return ms * 1e3 / calls_per_fn, "graph"
        except Exception:  # noqa: BLE001 - not capturable (host sync, allocation): time it eagerly
            torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return ms * 1e3 / calls_per_fn, "eager"


def copy_bandwidth() -> float:
    """Device-to-device copy of 256 MiB (read + write bytes), the achievable-bandwidth reference."""
    src = torch.empty(1 << 26, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    us, _ = bench(lambda: dst.copy_(src), graph=False)
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def fused_qkv(T, H, dtype=torch.bfloat16, device="cuda"):
    qkv = torch.randn(T, 3 * H * D, device=device, dtype=dtype) * 0.5
    return tuple(x.view(T, H, D) for x in qkv.split(H * D, dim=1))


@dataclass
class PrefillInputs:
    """One prefill problem as every provider sees it: layer-0 decay, bf16 q/k/v views, a pool of fresh slots."""

    rate: torch.Tensor
    cu: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pool: torch.Tensor
    slots: torch.Tensor
    fresh: torch.Tensor


def prefill_inputs(lengths: list[int], H: int, device: str = "cuda", dtype=torch.bfloat16) -> PrefillInputs:
    N, T = len(lengths), sum(lengths)
    q, k, v = fused_qkv(T, H, dtype=dtype, device=device)
    return PrefillInputs(
        rate=decay_rates(preset_config("ring-mini-linear-2.0"), 0).to(device)[:H],
        cu=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32),
        q=q,
        k=k,
        v=v,
        pool=torch.randn(N, H, D, D, device=device) * 0.02,
        slots=torch.arange(N, device=device, dtype=torch.int32),
        fresh=torch.ones(N, dtype=torch.int8, device=device),
    )


def prefill_rows(name, lengths, H, mods, copy_gbps, check, dtype=torch.bfloat16):
    x = prefill_inputs(lengths, H, dtype=dtype)
    rate, cu, q, k, v, pool, slots, fresh = x.rate, x.cu, x.q, x.k, x.v, x.pool, x.slots, x.fresh
    N, T = len(lengths), sum(lengths)
    scale = D**-0.5
    min_bytes = T * H * D * q.element_size() * 4 + N * H * D * D * 4 * 2  # q, k, v, o once; states in and out
    runs = {}

    def ours():
        return linear_attention_prefill(q, k, v, rate, scale, cu, pool, slots, fresh, max_seqlen=max(lengths))

    runs["ours"] = (ours, True)
    if dtype == torch.float32:  # what the engines pass: fp32 q/k from the norm+RoPE launch, v the GEMM's bf16 view
        v_engine = v.to(torch.bfloat16)
        v.copy_(v_engine)  # bf16 values in both rows: one reference for both

        def ours_engine():
            return linear_attention_prefill(
                q, k, v_engine, rate, scale, cu, pool, slots, fresh, max_seqlen=max(lengths)
            )

        runs["ours (engine layout: bf16 v)"] = (ours_engine, True)
    # Contiguous copies, made outside the timing: fla runs about 2x slower on strided views (measured on an
    # H200 with benchmarks/probe_fla_call.py), and seg_la takes one token stride; the baselines get their best.
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        g_gamma = -rate

        fla_cu = cu.long() if N > 1 else None  # fla's varlen path syncs with the host: timed eagerly

        def fla():  # fresh sequences (zero initial state); final states scattered into the pool
            o, ht = chunk_simple_gla(
                qc[None],
                kc[None],
                vc[None],
                g_gamma=g_gamma,
                scale=scale,
                initial_state=torch.zeros_like(pool),
                output_final_state=True,
                cu_seqlens=fla_cu,
            )
            pool[slots.long()] = ht
            return o[0]

        runs["fla chunk_simple_gla"] = (fla, N == 1)
    except ImportError:
        print("fla-core not installed: skipped")
    if "sglang" in mods:
        seg = mods["sglang"]
        meta = seg.SegLaMeta(
            batch_size=N,
            max_q_length=max(lengths),
            q_offsets=cu,
            s_offsets=slots,
            q_lengths=(cu[1:] - cu[:-1]).contiguous(),
            s_scales=torch.zeros(N, device="cuda", dtype=torch.int32),
        )
        runs["sglang seg_la"] = (lambda: seg.seg_la_fwd(qc, kc, vc, pool, rate, meta, softmax_scale=scale), True)
    if "vllm" in mods:
        light = mods["vllm"]
        per_req = [
            tuple(x[a:b].float().permute(1, 0, 2).contiguous()[None] for x in (q, k, v))
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
        ]
        scaled = [(qq * scale, kk, vv) for qq, kk, vv in per_req]  # vLLM's model scales q and passes fp32

        def vllm():
            return [
                light.lightning_attention(qq, kk, vv, rate, block_size=256, kv_history=pool[i : i + 1])
                for i, (qq, kk, vv) in enumerate(scaled)
            ]

        runs["vllm lightning_attention (fp32 in)"] = (vllm, True)

    rows = []
    reference = None
    if check:
        o64, _ = linear_attention_varlen(q.double(), k.double(), v.double(), rate.double(), scale, cu.cpu())
        reference = o64
    for provider, (fn, graph) in runs.items():
        err = None
        if check:
            pool.zero_()
            out = fn()
            if provider.startswith("vllm"):
                out = torch.cat([o[0].permute(1, 0, 2) for o, _ in out])
            err = rel_rms_error(reference, out)
        us, how = bench(fn, graph)
        gbps = min_bytes / (us * 1e-6) / 1e9
        rows.append(Row(name, provider, us, gbps, 100 * gbps / copy_gbps, how, err))
    return _ratios(rows)


def decode_rows(name, B, H, mods, copy_gbps, check):
    rate = decay_rates(preset_config("ring-mini-linear-2.0"), 18).cuda()[:H]
    state_bytes = B * H * D * D * 4
    sets = max(1, -(-L2_BYTES // state_bytes))  # distinct slot sets per graph so the states exceed L2
    pool = torch.randn(B * sets, H, D, D, device="cuda") * 0.02
    slot_sets = [torch.arange(i * B, (i + 1) * B, device="cuda", dtype=torch.int32) for i in range(sets)]
    q, k, v = fused_qkv(B, H)
    scale = D**-0.5
    min_bytes = 2 * state_bytes + B * H * D * 2 * 4
    runs = {"ours": lambda: [linear_attention_decode(q, k, v, rate, scale, pool, s) for s in slot_sets]}
    try:
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        g_gamma = -rate

        def fla():
            outs = []
            for s in slot_sets:
                o, ht = fused_recurrent_simple_gla(
                    q[:, None],
                    k[:, None],
                    v[:, None],
                    g_gamma=g_gamma,
                    scale=scale,
                    initial_state=pool[s.long()],
                    output_final_state=True,
                )
                pool[s.long()] = ht
                outs.append(o[:, 0])
            return outs

        runs["fla fused_recurrent (+gather/scatter)"] = fla
    except ImportError:
        pass
    if "sglang" in mods:
        seg = mods["sglang"]
        qc, kc, vc = (x.contiguous() for x in (q, k, v))
        metas = [
            seg.SegLaMeta(
                batch_size=B,
                max_q_length=1,
                q_offsets=torch.arange(B + 1, device="cuda", dtype=torch.int32),
                s_offsets=s,
                q_lengths=torch.ones(B, device="cuda", dtype=torch.int32),
                s_scales=torch.ones(B, device="cuda", dtype=torch.int32),
            )
            for s in slot_sets
        ]
        runs["sglang seg_la"] = lambda: [seg.seg_la_fwd(qc, kc, vc, pool, rate, m, softmax_scale=scale) for m in metas]
    if "vllm" in mods:
        light = mods["vllm"]
        q4, k4, v4 = (x[:, :, None].contiguous() for x in (q * scale, k, v))  # [B, H, 1, D], q pre-scaled
        runs["vllm linear_decode"] = lambda: [
            light.linear_decode_forward_triton(q4, k4, v4, pool, rate, s.long()) for s in slot_sets
        ]
    copy_src = torch.randn(sets * B, H, D, D, device="cuda")
    copy_dst = torch.empty_like(copy_src)

    def copy_ref():
        copy_dst.copy_(copy_src)

    rows = []
    us_copy, how = bench(copy_ref, True, sets)
    rows.append(Row(name, "torch copy of the state bytes", us_copy, 2 * state_bytes / (us_copy * 1e-6) / 1e9, 0.0, how))
    rows[-1].pct_copy = 100 * rows[-1].gbps / copy_gbps
    for provider, fn in runs.items():
        err = None
        if check:
            snapshot = pool.clone()
            outs = fn()
            out = outs[0].reshape(B, H, D)
            s0 = slot_sets[0].long()
            lam = torch.exp(-rate.double())[None, :, None, None]
            s_new = lam * snapshot[s0].double() + k.double()[..., :, None] * v.double()[..., None, :]
            ref = scale * torch.einsum("bhk,bhkv->bhv", q.double(), s_new)
            err = rel_rms_error(ref, out)
            pool.copy_(snapshot)
        us, how = bench(fn, True, sets)
        gbps = min_bytes / (us * 1e-6) / 1e9
        rows.append(Row(name, provider, us, gbps, 100 * gbps / copy_gbps, how, err))
    return _ratios(rows)


def backward_rows(name, T, H, copy_gbps):
    """Backward time = (forward + backward) - forward, both timed the same way; q/k/v/do bf16."""
    from common_kernels.ops.linear_attn.backward import linear_attention_varlen_triton

    rate = decay_rates(preset_config("ring-mini-linear-2.0"), 0).cuda()[:H]
    cu = torch.tensor([0, T], device="cuda", dtype=torch.int32)
    q, k, v = (x.detach().requires_grad_() for x in fused_qkv(T, H))  # ours: strided views, as the model has
    qc, kc, vc = (x.detach().contiguous().requires_grad_() for x in (q, k, v))  # fla: contiguous (its fast case)
    do = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    scale = D**-0.5
    runs = {"ours": (lambda: linear_attention_varlen_triton(q, k, v, rate, scale, cu)[0], (q, k, v))}
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        runs["fla chunk_simple_gla"] = (
            lambda: chunk_simple_gla(qc[None], kc[None], vc[None], g_gamma=-rate, scale=scale)[0][0],
            (qc, kc, vc),
        )
    except ImportError:
        pass
    rows, min_bytes = [], T * H * D * 2 * 7
    for provider, (forward, leaves) in runs.items():
        fwd_us, how_f = bench(lambda f=forward: f(), True)
        both_us, how_b = bench(lambda f=forward, x=leaves: torch.autograd.grad(f(), x, do), True)
        us = both_us - fwd_us
        gbps = min_bytes / (us * 1e-6) / 1e9
        rows.append(Row(name, provider, us, gbps, 100 * gbps / copy_gbps, how_b if how_f == how_b else "mixed"))
    return _ratios(rows)


def _ratios(rows: list[Row]) -> list[Row]:
    others = [r.us for r in rows if not r.provider.startswith(("ours", "torch copy"))]
    for r in rows:
        if r.provider.startswith("ours") and others:
            r.ratio_vs_best_other = min(others) / r.us
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ext-dir", type=Path, default=Path(".bench-ext"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--prefill", nargs="*", help="prefill cases to run (default: all)")
    parser.add_argument("--decode", type=int, nargs="*", help="decode batch sizes to run (default: all)")
    parser.add_argument("--backward", type=int, nargs="*", default=[4096, 32768], help="backward lengths (B=1)")
    parser.add_argument(
        "--dtype", nargs="+", default=["bf16"], choices=list(DTYPES), help="prefill q/k/v dtypes (engines pass fp32)"
    )
    args = parser.parse_args()
    mods = load_ext(args.ext_dir)
    copy_gbps = copy_bandwidth()
    print(
        f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"copy bandwidth {copy_gbps:.0f} GB/s | providers: ours, fla, {', '.join(mods) or 'no engine files'}"
    )
    prefill = {
        "4K": [4096],
        "32K": [32768],
        "128K": [131072],
        "32x1K": [1024] * 32,
        "8x4K": [4096] * 8,
        "64K+63x512": [65536] + [512] * 63,
    }
    decode = [1, 8, 32, 128, 256]
    if args.prefill is not None:
        prefill = {k: prefill[k] for k in args.prefill}
    if args.decode is not None:
        decode = args.decode
    print(
        f"{'case':24} {'provider':40} {'us':>10} {'GB/s':>8} {'%copy':>6} {'timing':>6} {'err':>9} {'x best other':>12}"
    )
    rows: list[Row] = []

    def report(case_rows: list[Row]) -> None:
        """Print one case as soon as it is measured, so a run cut short by a time limit keeps what it measured."""
        for r in case_rows:
            err = f"{r.err:.2e}" if r.err is not None else "-"
            ratio = f"{r.ratio_vs_best_other:.2f}x" if r.ratio_vs_best_other else ""
            print(
                f"{r.case:24} {r.provider:40} {r.us:10.1f} {r.gbps:8.0f} {r.pct_copy:6.1f} "
                f"{r.timing:>6} {err:>9} {ratio:>12}",
                flush=True,
            )
        rows.extend(case_rows)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))

    for H in args.heads:
        for name, lengths in prefill.items():
            for dtype in args.dtype:
                case = f"prefill {name} H{H}" + ("" if dtype == "bf16" else f" {dtype}")
                check = sum(lengths) <= 32768
                report(prefill_rows(case, lengths, H, mods, copy_gbps, check, DTYPES[dtype]))
        for B in decode:
            report(decode_rows(f"decode B{B} H{H}", B, H, mods, copy_gbps, check=True))
        for T in args.backward:
            report(backward_rows(f"backward {T // 1024}K H{H}", T, H, copy_gbps))


if __name__ == "__main__":
    main()
