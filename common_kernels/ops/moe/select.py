"""Aligned mode's expert selection, beside `naive.route` (same contract, steps 2-5 of its docstring): one Triton
program per token, so a token's experts and weights are the same bits in any batch, and the engine and the shim,
which both call `aligned_route`, choose alike.

`naive.route` is about 30 torch launches per MoE layer (the sigmoid, the group top-2, two stable sorts, the masks,
the slot-ordered normalisation); in a decode step of 64 tokens they cost more than the arithmetic. Here they are one
launch: the sigmoid scores, the biased selection scores, each group's best two, the `topk_group` best groups, then
the `k` best experts one at a time (ties to the lower index, as the stable sort gives them), their unbiased scores
normalised in slot order and scaled. Forward only: under autograd the weights' gradient is `naive.route`'s,
recomputed for the chosen experts (aligned mode's rule: the backward may be the standard one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import route
from .router_gemm import router_logits


@triton.jit
def _select_experts_kernel(
    logits, bias, ids, weights, E, n_group, topk_group, k, scale, stride_logits,
    HAS_BIAS: tl.constexpr, NORMALISE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr, SHARED_SLOT: tl.constexpr,
):  # fmt: skip
    """Token `program_id(0)`'s `k` experts (`ids`, in selection order) and weights, from its fp32 logits `[E]`;
    `SHARED_SLOT`: then one more slot, expert `E` (a shared expert) with weight 1 (rows of `k + 1`)."""
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    live = experts < E
    z = tl.load(logits + token * stride_logits + experts, mask=live, other=0.0).to(tl.float32)
    score = 1.0 / (1.0 + tl.exp(-z))
    choice = score + tl.load(bias + experts, mask=live, other=0.0).to(tl.float32) if HAS_BIAS else score
    choice = tl.where(live, choice, float("-inf"))
    group_of = experts // (E // n_group)
    groups = tl.arange(0, BLOCK_G)
    group_score = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for g in range(n_group):  # a group scores the sum of its two best selection scores (its best, if it has one)
        member = group_of == g
        in_group = tl.where(member, choice, float("-inf"))
        best = tl.argmax(in_group, axis=0, tie_break_left=True)
        first = tl.max(in_group, axis=0)
        second = tl.max(tl.where(experts == best, float("-inf"), in_group), axis=0)
        # a one-expert group has no second: its best alone (`x + 0` is `x`)
        group_score = tl.where(groups == g, first + tl.where(second == float("-inf"), 0.0, second), group_score)
    allowed = experts < 0
    for _ in range(topk_group):  # the best groups, ties to the lower index
        g = tl.argmax(group_score, axis=0, tie_break_left=True)
        allowed = allowed | (group_of == g)
        group_score = tl.where(groups == g, float("-inf"), group_score)
    remaining = tl.where(allowed & live, choice, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    chosen = tl.zeros([BLOCK_K], dtype=tl.int64)
    chosen_score = tl.zeros([BLOCK_K], dtype=tl.float32)
    total = tl.sum(tl.zeros([BLOCK_K], dtype=tl.float32), axis=0)
    for slot in range(k):  # the best experts one at a time, ties to the lower index; weights summed in slot order
        e = tl.argmax(remaining, axis=0, tie_break_left=True)
        p = tl.sum(tl.where(experts == e, score, 0.0), axis=0)
        total = total + p  # `0 + p` is `p`: the first slot's weight, then the others in order
        chosen = tl.where(slots == slot, e.to(tl.int64), chosen)
        chosen_score = tl.where(slots == slot, p, chosen_score)
        remaining = tl.where(experts == e, float("-inf"), remaining)
    if NORMALISE:
        chosen_score = chosen_score / (total + 1e-20)
    width = k + 1 if SHARED_SLOT else k
    tl.store(ids + token * width + slots, chosen, mask=slots < k)
    tl.store(weights + token * width + slots, chosen_score * scale, mask=slots < k)
    if SHARED_SLOT:
        tl.store(ids + token * width + k, E.to(tl.int64))
        tl.store(weights + token * width + k, 1.0)


def _launch(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    n_group: int,
    topk_group: int,
    scale: float,
    normalise: bool,
    shared_slot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    problems = []
    if logits.dtype != torch.float32:
        problems.append(f"logits must be fp32 (the router GEMM's), got {logits.dtype}")
    if bias is not None and bias.shape != (E,):
        problems.append(f"expert_bias {tuple(bias.shape)} must be [{E}]")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group or not 1 <= k <= topk_group * (E // n_group):
        problems.append(
            f"n_group {n_group}, topk_group {topk_group}, k {k}: n_group must divide the {E} experts, topk_group lie "
            "in 1..n_group and k in 1..(the experts of topk_group groups)"
        )
    if problems:
        raise ValueError("expert selection: " + "; ".join(problems))
    ids = torch.empty((T, k + shared_slot), dtype=torch.int64, device=logits.device)
    weights = torch.empty((T, k + shared_slot), dtype=torch.float32, device=logits.device)
    if T:
        logits = logits.contiguous()
        _select_experts_kernel[(T,)](
            logits, logits if bias is None else bias.contiguous(), ids, weights, E, n_group, topk_group, k,
            float(scale), logits.stride(0), bias is not None, normalise, triton.next_power_of_2(E),
            triton.next_power_of_2(n_group), triton.next_power_of_2(k), shared_slot,
        )  # fmt: skip
    return ids, weights


class _SelectExperts(torch.autograd.Function):
    """The kernel's choice and weights; the weights' gradient is `naive.route`'s for the chosen experts."""

    @staticmethod
    def forward(ctx, logits, bias, k, n_group, topk_group, scale, normalise):
        ids, weights = _launch(logits, bias, k, n_group, topk_group, scale, normalise)
        ctx.save_for_backward(logits, ids)
        ctx.scale, ctx.normalise = scale, normalise
        ctx.mark_non_differentiable(ids)
        return ids, weights

    @staticmethod
    def backward(ctx, _d_ids, d_weights):
        logits, ids = ctx.saved_tensors
        with torch.enable_grad():
            z = logits.detach().requires_grad_()
            chosen = torch.sigmoid(z).gather(1, ids)
            if ctx.normalise:
                chosen = chosen / (chosen.sum(-1, keepdim=True) + 1e-20)
            (d_logits,) = torch.autograd.grad(chosen * ctx.scale, z, d_weights)
        return d_logits, None, None, None, None, None, None


def select_experts(
    logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    num_experts_per_tok: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`naive.route`'s steps 2-5 from fp32 router logits `[T, E]`: expert ids `[T, k]` (int64, in selection order)
    and fp32 weights `[T, k]`; differentiable in the logits."""
    return _SelectExperts.apply(
        logits, expert_bias, num_experts_per_tok, n_group, topk_group, routed_scaling_factor, norm_topk_prob
    )


def aligned_route(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    num_experts_per_tok: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    shared_slot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`naive.route` as aligned mode runs it, on both sides: the batch-invariant router GEMM, then `select_experts`.
    A float64 model has nothing to align with, and takes `naive.route`. `shared_slot` (an engine's forward, no
    gradient): each token's row gets one more slot, expert `E` with weight 1, for a shared expert that rides in the
    routed experts' launch."""
    if shared_slot:
        logits = router_logits(hidden, gate_weight, invariant=True)
        return _launch(
            logits, expert_bias, num_experts_per_tok, n_group, topk_group, routed_scaling_factor, norm_topk_prob,
            shared_slot=True,
        )  # fmt: skip
    if hidden.dtype == torch.float64:
        return route(
            hidden, gate_weight, expert_bias, num_experts_per_tok, n_group, topk_group, routed_scaling_factor,
            norm_topk_prob,
        )  # fmt: skip
    logits = router_logits(hidden, gate_weight, invariant=True)
    return select_experts(
        logits, expert_bias, num_experts_per_tok, n_group, topk_group, routed_scaling_factor, norm_topk_prob
    )
