"""The router GEMM: fp32 logits from the activations and the fp32 gate weight, never rounded to bf16.

`RING_LINEAR_ROUTER_PRODUCTS` picks how (the shim and the engines read the same setting):
- `fp32` (default): one fp32 GEMM. On a GPU that is cuBLAS's SIMT kernel, the third-largest GEMM time of a
  served prefill step for both Ring-mini and its twin (RESULTS.md run M).
- `bf16x3`: the weight split into three bf16 parts whose sum is the weight to fp32 rounding. A bf16 activation
  times a bf16 part is exact in fp32, so one bf16 tensor-core GEMM with fp32 output over the stacked parts, and
  the parts' sum, give the fp32 GEMM's logits up to the order of fp32 additions. Used for bf16 activations
  without autograd (serving, no-grad scoring); fp32 activations and training take the fp32 GEMM. Opt-in until
  its GPU timing and logprob check have run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ...precision import ROUTER_DTYPE, compute_dtype

ROUTER_PRODUCT_CHOICES = ("fp32", "bf16x3")
ROUTER_PRODUCTS = os.environ.get("RING_LINEAR_ROUTER_PRODUCTS", "fp32")
if ROUTER_PRODUCTS not in ROUTER_PRODUCT_CHOICES:
    raise ValueError(
        f"RING_LINEAR_ROUTER_PRODUCTS={ROUTER_PRODUCTS!r}: choose one of {', '.join(ROUTER_PRODUCT_CHOICES)}"
    )


def split_bf16x3(weight: torch.Tensor) -> torch.Tensor:
    """`[3E, D]` bf16: the fp32 `weight` `[E, D]`'s leading, middle and trailing bf16 parts, stacked."""
    high = weight.to(torch.bfloat16)
    rest = weight - high.float()
    middle = rest.to(torch.bfloat16)
    low = (rest - middle.float()).to(torch.bfloat16)
    return torch.cat([high, middle, low])


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` in fp32 (float64 for float64 inputs), `x` `[T, D]`, `weight` `[E, D]`."""
    differentiable = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if (
        ROUTER_PRODUCTS == "bf16x3"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.float32
        and not differentiable
    ):
        parts = split_bf16x3(weight)
        # CPU torch has no bf16 x bf16 -> fp32 mm: the parts widened are exact, so the fp32 GEMM is the same sum
        y = torch.mm(x, parts.t(), out_dtype=torch.float32) if x.is_cuda else F.linear(x.float(), parts.float())
        E = weight.shape[0]
        return (y[:, 2 * E :] + y[:, E : 2 * E]) + y[:, :E]  # the small parts first
    dtype = compute_dtype(ROUTER_DTYPE, x.dtype)
    return F.linear(x.to(dtype), weight.to(dtype))
