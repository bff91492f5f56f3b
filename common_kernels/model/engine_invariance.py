"""Aligned scoring in a trainer's process: the log-softmax settings an aligned engine runs under.

Aligned mode runs each engine under its own batch invariance: vLLM's `VLLM_BATCH_INVARIANT=1` (no reduced-precision
reductions; its row kernel for log-softmax) or SGLang's `--enable-deterministic-inference` (its own log-softmax
kernel, its persistent GEMM for any `mm`/`addmm` left). Our layers' GEMMs are our own kernels on both sides (the
projections through `ops.moe.router_gemm.aligned_linear`). The shim's log-softmax gives that engine's bits only
under the same settings, so aligned scoring on a GPU turns them on in this process (once;
they stay on, process-wide) when the engine is installed, and warns once where it is not. The two engines'
settings replace the same torch operators, so one process aligns with one engine. cuBLAS reads its workspace
setting when it first runs, so a trainer that multiplied on the GPU before should call this first
(`RingLinearForCausalLM.token_logprobs(aligned=True)` calls it on each use).
"""

from __future__ import annotations

import os
import warnings

from ..errors import InvalidInputError

ENGINES = ("vllm", "sglang")
_state: dict[str, str | None] = {"engine": None}


def use_engine_invariance(engine: str = "vllm") -> bool:
    """Turn on `engine`'s batch-invariant settings in this process; False (with one warning) without the engine."""
    check_engine(engine)
    if _state["engine"] is not None:
        if _state["engine"] not in (engine, "none"):
            raise InvalidInputError(
                f"engine {engine!r}: this process already runs {_state['engine']}'s batch-invariant operators (they "
                "replace the same torch operators); score against one engine per process"
            )
        return _state["engine"] == engine
    try:
        if engine == "vllm":
            _init_vllm_batch_invariance()
        else:
            from sglang.srt.batch_invariant_ops.batch_invariant_ops import enable_batch_invariant_mode

            enable_batch_invariant_mode()
    except ImportError:
        warnings.warn(
            f"ring-linear: aligned scoring without {engine} installed uses torch's cuBLAS choices and log-softmax, not "
            f"the aligned engine's: logprobs will be close to the engine's, not bitwise (pip install {engine})",
            stacklevel=3,
        )
        _state["engine"] = "none"
        return False
    _state["engine"] = engine
    return True


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise InvalidInputError(f"engine {engine!r}: aligned scoring matches one of {', '.join(ENGINES)}")


def _init_vllm_batch_invariance() -> None:
    """vLLM's `init_batch_invariance`, which acts only under `VLLM_BATCH_INVARIANT=1`: set for the call and put back,
    so an engine this process starts later is not put in batch-invariant mode by it (the cuBLAS settings vLLM
    writes stay: cuBLAS reads them)."""
    previous = os.environ.get("VLLM_BATCH_INVARIANT")
    os.environ["VLLM_BATCH_INVARIANT"] = "1"
    try:
        _vllm_batch_invariance().init_batch_invariance()
    finally:
        if previous is None:
            os.environ.pop("VLLM_BATCH_INVARIANT", None)
        else:
            os.environ["VLLM_BATCH_INVARIANT"] = previous


def _vllm_batch_invariance():
    """vLLM's batch-invariance module: `model_executor.layers` in 0.26, `model_executor.determinism` by 0.33."""
    try:
        from vllm.model_executor.determinism import batch_invariant
    except ImportError:
        from vllm.model_executor.layers import batch_invariant
    return batch_invariant
