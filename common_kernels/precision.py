"""The precision policy: which intermediate runs in which dtype, written down once.

The paper's RL alignment work (section 5.2) fixed these modules so training and rollout agree; every
stack of this project (training shim, vLLM and SGLang adapters) follows this table. A float64 model
runs everything in float64 (these dtypes are then raised to float64 by `compute_dtype`).

- linear-attention state: fp32. A bf16 state drifts with length (about 7% after 4K decode steps).
- linear-attention q/k/v and output: fp32 from the QKV GEMM on, through qk-norm, RoPE, the
  recurrence, the group norm and the gate (as the authors' engine). On a GPU the Triton kernels
  multiply these fp32 operands on TF32 tensor cores unless `RING_LINEAR_FP32_DOT` says otherwise
  (`common_kernels/ops/triton_settings.py`).
- RMSNorm (all): fp32 statistics, cast back to the activation dtype, then times the weight
  (the HF Ling-2.0 order).
- RoPE: cos/sin and the rotation in fp32, the result cast back.
- softmax attention: scores and softmax in fp32.
- residual stream: fp32, add and norm unfused (paper: FP32 residual, unfused add + norm).
- MoE router: fp32 GEMM, sigmoid and top-k, logits never rounded to bf16 (near-ties choose experts). With bf16
  activations and no autograd the GEMM runs as three exact bf16 products on the tensor cores (`ops/moe/router_gemm.py`;
  `RING_LINEAR_ROUTER_PRODUCTS=fp32` keeps the fp32 GEMM).
- MoE combine: fp32 weighted sum in a fixed (token, slot) order (deterministic).
- LM head: fp32 accumulation, fp32 logits (paper: FP32 LM head).
"""

from __future__ import annotations

import torch

STATE_DTYPE = torch.float32
LINEAR_ATTN_DTYPE = torch.float32
NORM_DTYPE = torch.float32
ROPE_DTYPE = torch.float32
ATTN_SOFTMAX_DTYPE = torch.float32
RESIDUAL_DTYPE = torch.float32
ROUTER_DTYPE = torch.float32
LOGITS_DTYPE = torch.float32


def compute_dtype(policy_dtype: torch.dtype, activation_dtype: torch.dtype) -> torch.dtype:
    """The dtype an op runs in: the policy's, or float64 in a float64 reference run. A narrower policy (a bf16
    probe of `LINEAR_ATTN_DTYPE`) holds for fp32 activations too."""
    if activation_dtype == torch.float64:
        return activation_dtype
    return policy_dtype
