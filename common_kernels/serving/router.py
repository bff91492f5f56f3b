"""The MoE router gate as an engine holds it: `mlp.gate.weight` and `mlp.gate.expert_bias`, both fp32."""

from __future__ import annotations

import torch
from torch import nn

from ..config import RingLinearConfig
from ..ops.moe.router_gemm import router_logits
from ..precision import ROUTER_DTYPE


class RouterGate(nn.Module):
    """Router logits in fp32 from an fp32 weight, never rounded to bf16 (near-ties pick the experts); the
    expert bias only selects experts and stays fp32 too. Engines hand both to their fused MoE. `invariant`:
    aligned mode's batch-invariant router GEMM (`ops.moe.router_gemm`)."""

    def __init__(self, config: RingLinearConfig, invariant: bool = False) -> None:
        super().__init__()
        self.invariant = invariant
        c = config  # the top-k settings, in the order `ops.moe.aligned.aligned_moe` takes them
        self.routing = (c.num_experts_per_tok, c.n_group, c.topk_group, c.routed_scaling_factor, c.norm_topk_prob)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=ROUTER_DTYPE))
        self.expert_bias = (
            nn.Parameter(torch.zeros(config.num_experts, dtype=ROUTER_DTYPE))
            if config.moe_router_enable_expert_bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return router_logits(x, self.weight, invariant=self.invariant)
