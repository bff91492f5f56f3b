"""Helpers shared by the tests of every op and stack: tolerances (no CI leniency, NaN always fails) and the
multi-process runs of the engines' CPU parallelism checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def rel_rms_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """`rms(out - ref) / rms(ref)` in float64 (0 when both are empty or all zero)."""
    if ref.numel() == 0:
        return 0.0
    ref64, out64 = ref.detach().double(), out.detach().double()
    denom = ref64.pow(2).mean().sqrt().item()
    err = (out64 - ref64).pow(2).mean().sqrt().item()
    return err if denom == 0.0 else err / denom


def assert_rel_rms(name: str, ref: torch.Tensor, out: torch.Tensor, max_ratio: float) -> None:
    """Fail unless `out` matches `ref` in shape, is finite, and has relative RMS error <= `max_ratio`."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ratio = rel_rms_error(ref, out)
    max_abs = (out.detach().double() - ref.detach().double()).abs().max().item() if out.numel() else 0.0
    assert ratio <= max_ratio, f"{name}: relative RMS error {ratio:.3e} > {max_ratio:.1e} (max abs diff {max_abs:.3e})"


# An engine's logprobs against the shim's, per serving dtype: (max, mean) absolute difference. The engines' fused
# MoE and attention run TF32 (fp32) or bf16 products, and a router near-tie then picks other experts for a token:
# that sets the max; a wrong weight, slope or state shows as O(1) differences on most tokens, which the mean
# catches. The measured figures are in benchmarks/RESULTS.md.
ENGINE_LOGPROB_BOUNDS = {"float32": (0.1, 2e-3), "bfloat16": (0.5, 1e-2)}
# A router choice closer than this (`selection_margin`) may flip under the engine's rounding.
ENGINE_ROUTER_TIE = {"float32": 1e-3, "bfloat16": 1e-2}


def near_ties(partings: Sequence[tuple], dtype: str) -> bool:
    """Whether every greedy parting `(prompt, position, logit margin, router margin)` is a near-tie: the shim
    preferred its token by less than the engine's logprob error, or a router choice there was closer than the
    engine's rounding. Wide margins at a parting are a fault."""
    max_bound, tie = ENGINE_LOGPROB_BOUNDS[dtype][0], ENGINE_ROUTER_TIE[dtype]
    return all(logit < max_bound or router < tie for _, _, logit, router in partings)


def kernel_tolerance(dtype: torch.dtype) -> float:
    """Relative RMS bound of a Triton linear-attention kernel against float64, for outputs of `dtype`.

    bf16: 3e-3 on a GPU; Triton 3.6's interpreter truncates fp32 -> bf16 instead of rounding to nearest (mean
    relative error 2.8e-3 against 1.4e-3 measured), so on the CPU it is doubled. fp32 inputs through `tl.dot`:
    the interpreter multiplies exactly; a GPU runs the products `RING_LINEAR_FP32_DOT` chooses, TF32 by default
    (10-bit mantissa operands: about 5e-4 relative error)."""
    from common_kernels.ops import triton_settings

    on_gpu = torch.cuda.is_available()
    if dtype == torch.bfloat16:
        return 3e-3 if on_gpu else 6e-3
    return 2e-3 if on_gpu and triton_settings.FP32_DOT_PRECISION == "tf32" else 1e-5


def pool_reference(q, k, v, rate, scale, cu_seqlens, pool, slots, fresh) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 varlen reference of a prefill on a state pool, on the kernel's own (rounded) inputs: each
    sequence starts from `pool[slot]` unless fresh or padding (slot -1). Returns (o, final states)."""
    from common_kernels.ops.linear_attn.naive import linear_attention_varlen

    zeros = torch.zeros(pool.shape[1:], dtype=torch.float64, device=pool.device)
    pairs = zip(slots.tolist(), fresh.tolist(), strict=True)
    init = [pool[s].double() if s >= 0 and not f else zeros for s, f in pairs]
    initial = torch.stack(init) if init else None
    return linear_attention_varlen(q.double(), k.double(), v.double(), rate.double(), scale, cu_seqlens, initial)


def check_prefill_on_a_stale_pool(prefill, q, k, v, rate, scale, cu_seqlens, spare: int = 2) -> None:
    """Run `prefill(pool, slots, fresh) -> o` on a pool of random states with `spare` slots no sequence uses:
    every other sequence fresh (its slot filled with NaN, which must never be read), the last of three or more
    padding (slot -1), and check o and the final states against float64 and that no other slot changed."""
    N, H, K, V = cu_seqlens.numel() - 1, q.shape[1], q.shape[2], v.shape[2]
    pool = torch.randn(N + spare, H, K, V, device=q.device)
    slots = torch.randperm(N + spare, device=q.device)[:N]
    fresh = (torch.arange(N, device=q.device) % 2 == 0).to(torch.int8)
    if N:
        pool[slots[fresh.bool()]] = float("nan")
    if N > 2:
        slots[-1] = -1
    updated = pool.clone()
    o = prefill(updated, slots, fresh)
    o_ref, s_ref = pool_reference(q, k, v, rate, scale, cu_seqlens, pool, slots, fresh)
    assert o.dtype == q.dtype
    assert_rel_rms("o", o_ref, o, kernel_tolerance(q.dtype))
    for n, s in enumerate(slots.tolist()):
        if s >= 0:
            assert_rel_rms(f"state[{n}]", s_ref[n], updated[s], kernel_tolerance(torch.float32))
    others = [p for p in range(N + spare) if p not in slots.tolist()]
    assert torch.equal(updated[others].nan_to_num(), pool[others].nan_to_num())


def ragged_offsets(lengths: list[int]) -> torch.Tensor:
    """`cu_seqlens` for the given sequence lengths (zeros allowed)."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.long)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    worker: Path, args: Sequence[str], out_dir: Path, world_size: int = 2, timeout_s: float = 600
) -> list[Path]:
    """Run `python WORKER *ARGS RANK PORT OUT` as ranks 0 .. world_size-1 of one process group (rank 0 listens on
    PORT), with the working directory on PYTHONPATH; returns each rank's OUT. A rank that fails fails the caller
    with the tail of every rank's log."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    outs = [Path(out_dir) / f"rank{rank}.out" for rank in range(world_size)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *map(str, args), str(rank), str(port), str(outs[rank])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(world_size)
    ]
    logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return outs
