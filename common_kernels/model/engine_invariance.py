"""Aligned scoring in a trainer's process: the GEMM and log-softmax settings an aligned vLLM engine runs under.

Aligned mode turns on vLLM's batch invariance (`VLLM_BATCH_INVARIANT=1`). On Hopper that sets cuBLAS to one kernel
per shape (no split-K workspace, no reduced-precision reductions, exact fp32 products) and replaces torch's
log-softmax with vLLM's row kernel. The shim's projections and log-softmax give the engine's bits only under the
same settings, so aligned scoring on a GPU turns them on in this process when vLLM is installed (once; they stay on,
process-wide) and warns once where it is not. cuBLAS reads its workspace setting when it first runs, so a trainer
that multiplied on the GPU before should call this first (`RingLinearForCausalLM.token_logprobs(aligned=True)`
calls it on each use)."""

from __future__ import annotations

import os
import warnings

_state = {"on": None}


def use_engine_invariance() -> bool:
    """Turn on vLLM's batch-invariant settings in this process; False (with one warning) without vLLM."""
    if _state["on"] is None:
        try:
            from vllm.model_executor.layers import batch_invariant
        except ImportError:
            warnings.warn(
                "ring-linear: aligned scoring without vLLM installed uses torch's cuBLAS choices and log-softmax, not "
                "the aligned engine's: logprobs will be close to the engine's, not bitwise (pip install vllm)",
                stacklevel=3,
            )
            _state["on"] = False
            return False
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
        batch_invariant.init_batch_invariance()
        _state["on"] = True
    return _state["on"]
