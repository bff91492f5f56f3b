"""The linear-attention layer's math between its projections, shared by the training shim and both engines.

`prepare_qkv` takes the QKV GEMM output to q, k (qk-RMSNorm + partial RoPE) and v; `gate_output` takes the
attention output to the input of `dense` (group RMSNorm, sigmoid gate, cast to the model dtype). Each runs
the Triton kernels or the plain-PyTorch references (`use_triton`), and the two agree: the kernels reproduce
the references' roundings. The precision policy (`common_kernels.precision`) puts q/k/v in fp32 after the
GEMM; the fused path computes exactly that without materialising an fp32 copy of the GEMM output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.norm.fused import group_rms_norm_gate_triton
from ..ops.norm.naive import group_rms_norm_gate
from ..ops.rope.fused import qk_norm_rope_packed, qk_norm_rope_triton
from ..ops.rope.naive import qk_norm_rope
from ..precision import LINEAR_ATTN_DTYPE, compute_dtype


def prepare_qkv(
    qkv: torch.Tensor,
    num_heads: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    silu: bool = False,
    use_triton: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k `[T, H, d]` in the linear-attention dtype (fp32) and v `[T, H, d]` from the QKV output `[T, 3*H*d]`.

    Without autograd on the Triton path (an engine step, the shim's no-grad scoring), q and k come from one
    launch over the fused output and v stays a view of it in the GEMM dtype: the kernels widen it on load,
    which is exact. Otherwise (training, the references, `silu`) the output is cast first, as the policy
    reads; callers that need v in the q/k dtype cast it (`v.to(q.dtype)`), bit for bit the same values.
    """
    T = qkv.shape[0]
    dtype = compute_dtype(LINEAR_ATTN_DTYPE, qkv.dtype)
    heads = qkv.view(T, 3 * num_heads, -1)
    differentiable = torch.is_grad_enabled() and qkv.requires_grad
    if use_triton and not silu and not differentiable and dtype == torch.float32:
        qk = qk_norm_rope_packed(heads[:, : 2 * num_heads], num_heads, q_weight, k_weight, cos, sin, eps, dtype)
        return qk[:, :num_heads], qk[:, num_heads:], heads[:, 2 * num_heads :]
    heads = heads.to(dtype)
    if silu:
        heads = F.silu(heads)
    q, k, v = heads.split(num_heads, dim=1)
    q, k = (qk_norm_rope_triton if use_triton else qk_norm_rope)(q, k, q_weight, k_weight, cos, sin, eps)
    return q, k, v


def gate_output(
    o: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    num_groups: int,
    eps: float,
    out_dtype: torch.dtype,
    use_triton: bool = True,
) -> torch.Tensor:
    """`RMSNorm_group(o) * weight * sigmoid(gate)` in fp32, written once in `out_dtype` (the input of `dense`).

    Args:
        o: `[T, H*d]` or `[T, H, d]` attention output; gate: `[T, H*d]` (`g_proj` output, any float dtype);
            weight: `[H*d]`.
    """
    o = o.reshape(o.shape[0], -1)  # the engines' attention layers hand back either layout
    if use_triton:
        return group_rms_norm_gate_triton(o, gate, weight, num_groups, eps, out_dtype)
    return group_rms_norm_gate(o, gate, weight, num_groups, eps).to(out_dtype)
