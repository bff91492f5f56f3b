"""Aligned mode's projections (`ops.moe.router_gemm.aligned_linear`) and the engine-side method that runs them
(`serving.projections`): float64-close, a row's bits alone equal to in a batch, the plain gradient, and an engine
layer's `apply` routed through them with the rest of its method kept."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common_kernels.model.layers import Projection
from common_kernels.ops.moe.router_gemm import aligned_linear
from common_kernels.serving import use_aligned_projections
from common_kernels.serving.projections import AlignedProjection


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_a_projection_is_float64_close_in_the_inputs_dtype_and_batch_invariant(dtype, tol):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 48, generator=g).to(dtype)  # any leading dims
    w = (torch.randn(40, 48, generator=g) * 0.1).to(dtype)
    y = aligned_linear(x, w)
    assert y.dtype == dtype and y.shape == (2, 9, 40)
    want = x.double() @ w.double().t()
    assert (y.double() - want).abs().max() <= tol * want.abs().max()
    assert torch.equal(aligned_linear(x[1, 4:5], w), y[1, 4:5])


def test_a_projection_takes_the_plain_gradient():
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    g = torch.randn(5, 8)
    dx, dw = torch.autograd.grad(aligned_linear(x, w), (x, w), g)
    torch.testing.assert_close(dx, g @ w.detach())
    torch.testing.assert_close(dw, g.t() @ x.detach())


def test_the_shims_aligned_projection_is_the_engines():
    layer = Projection(16, 8)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x, aligned=True), aligned_linear(x, layer.weight))
    assert torch.equal(layer(x), F.linear(x, layer.weight))


class EngineMethod:
    """Stands in for an engine's unquantized linear method: it made the weight; its `apply` must not run."""

    marker = "the engine's"

    def apply(self, layer, x, bias=None):
        raise AssertionError("the engine's GEMM ran")


def test_an_engine_layer_multiplies_through_aligned_linear_and_keeps_the_rest_of_its_method():
    layer = nn.Linear(16, 8, bias=False)
    layer.quant_method = EngineMethod()
    use_aligned_projections(layer)
    assert isinstance(layer.quant_method, AlignedProjection) and layer.quant_method.marker == "the engine's"
    x = torch.randn(4, 16)
    assert torch.equal(layer.quant_method.apply(layer, x), aligned_linear(x, layer.weight))
    with pytest.raises(NotImplementedError, match="no bias"):
        layer.quant_method.apply(layer, x, torch.zeros(8))
