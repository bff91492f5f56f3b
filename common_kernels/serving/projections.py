"""Aligned mode's projections in an engine: a projection layer's `quant_method` whose `apply` is aligned mode's
invariant GEMM (`ops.moe.router_gemm.aligned_linear`), the one the shim's `Projection` runs, in place of the
engine's own (cuBLAS picks its kernel by the batch; vLLM's and SGLang's batch-invariant GEMMs give other bits than
the shim's and run a decode's few rows on a handful of tiles)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.moe.router_gemm import aligned_linear


class AlignedProjection:
    """Wraps a layer's unquantized method: `apply` multiplies through `aligned_linear`; everything else (the weight
    the method created, its loaders) stays the engine's."""

    def __init__(self, method: Any) -> None:
        self.method = method

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is not None:
            raise NotImplementedError("ring-linear: aligned mode's projections have no bias")
        return aligned_linear(x, layer.weight)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["method"], name)


def use_aligned_projections(*layers: nn.Module) -> None:
    """Give each engine projection layer (vLLM's or SGLang's `LinearBase`, unquantized) aligned mode's GEMM."""
    for layer in layers:
        layer.quant_method = AlignedProjection(layer.quant_method)
