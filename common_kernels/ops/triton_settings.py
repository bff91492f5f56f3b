"""Settings every Triton kernel family here shares: whether the interpreter runs them, how `tl.dot` multiplies
fp32 operands, and the device's SM count and shared memory that launch heuristics size their grids and
pipelines by."""

from __future__ import annotations

import functools
import os

import torch

# Triton 3.6's interpreter multiplies bf16/fp16 `tl.dot` operands as raw integer bits (its `create_dot`
# calls np.matmul on the stored bits), so under TRITON_INTERPRET the kernels upcast dot operands to fp32.
# On a GPU the real bf16 MMA runs; GPU tests check those numerics.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


FP32_DOT_CHOICES = ("tf32", "tf32x3", "ieee")
# How `tl.dot` multiplies fp32 operands (the q/k/v policy is fp32). Measured in vLLM on an H200, Ring-mini
# prefill of 16K tokens, per linear layer: tf32 0.43 ms, tf32x3 1.5 ms, ieee 58 ms (Triton's ieee path runs
# on the FMA units and spills). tf32 is what vLLM's, SGLang's and the authors' kernels do with fp32 inputs;
# tf32x3 (three TF32 products) is fp32-accurate; ieee is the exact product, for tests and checks only.
FP32_DOT_PRECISION = os.environ.get("RING_LINEAR_FP32_DOT", "tf32")
if FP32_DOT_PRECISION not in FP32_DOT_CHOICES:
    raise ValueError(f"RING_LINEAR_FP32_DOT={FP32_DOT_PRECISION!r}: choose one of {', '.join(FP32_DOT_CHOICES)}")


CPU_SM_COUNT = 132  # where there is no GPU to ask (the interpreter): an H100/H200's


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors, which the launch heuristics size their grids by."""
    if device.type != "cuda":
        return CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


CPU_MAX_SHARED_MEMORY = 232448  # likewise: an H100/H200's bytes per program


@functools.cache
def max_shared_memory(device: torch.device) -> int:
    """The bytes of shared memory one program may use on the device (Triton refuses a launch that needs more)."""
    if device.type != "cuda" or INTERPRET:
        return CPU_MAX_SHARED_MEMORY
    import triton

    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def dot_precision(x: torch.Tensor) -> str:
    """The `input_precision` of the kernels' `tl.dot` for inputs like `x`.

    fp32 inputs follow `FP32_DOT_PRECISION` (read at each launch, so a test may switch it); for bf16/fp16
    inputs the setting is ignored and the tensor cores run on the 16-bit operands. The training shim and both
    engines call the same kernels, so they share the choice and stay equal to each other whichever it is.
    """
    return FP32_DOT_PRECISION if x.dtype == torch.float32 else "tf32"
