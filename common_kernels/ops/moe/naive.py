"""SwiGLU MLP and the sigmoid, group-limited MoE router ("noaux_tc"), in plain PyTorch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ...precision import ROUTER_DTYPE, compute_dtype
from .router_gemm import router_logits


def swiglu_mlp(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """`down(silu(gate(x)) * up(x))`, bias-free, in the dtype of `x`.

    Args:
        x: `[T, D]`; gate_w, up_w: `[I, D]`; down_w: `[D, I]`.
    """
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def _stable_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row; ties go to the lower index (deterministic)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def route(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    num_experts_per_tok: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts and their weights for each token (aligned mode's: `select.aligned_route`).

    1. logits `z = x W_r^T` in fp32 (both operands upcast; never rounded to bf16), scores `p = sigmoid(z)`;
    2. selection scores `p + expert_bias` (the bias only chooses, it never weights);
    3. experts split into `n_group` contiguous groups, a group scores the sum of its 2 best selection
       scores, the `topk_group` best groups stay, the rest are masked to -inf;
    4. the `num_experts_per_tok` best experts by selection score, ties to the lower index;
    5. weights are the unbiased `p` of those experts, divided by their sum (+1e-20) when
       `norm_topk_prob` (summed in slot order), times `routed_scaling_factor`.

    Args:
        hidden: `[T, D]`; gate_weight: `[E, D]`; expert_bias: `[E]` or None.

    Returns:
        expert ids `[T, k]` (int64) and weights `[T, k]` (fp32, float64 for float64 input).
    """
    scores, _, masked = _selection(hidden, gate_weight, expert_bias, n_group, topk_group)
    topk_ids = _stable_topk_indices(masked, num_experts_per_tok)
    weights = scores.gather(1, topk_ids)
    if norm_topk_prob:  # summed in slot order: torch's own reduction picks its layout by the number of rows
        total = weights[:, :1]
        for slot in range(1, weights.shape[1]):
            total = total + weights[:, slot : slot + 1]
        weights = weights / (total + 1e-20)
    return topk_ids, weights * routed_scaling_factor


def selection_margin(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    num_experts_per_tok: int,
    n_group: int,
    topk_group: int,
) -> torch.Tensor:
    """How far each token's expert choice (`route`) is from changing, `[T]`: no change of every selection score by
    less than this can change the chosen experts. An expert gap closes when two scores move by half of it each; a
    group score sums two selection scores, so a group gap closes at a quarter of it.

    A tiny margin is a router near-tie: two correct implementations that round differently may choose different
    experts there, and their outputs then differ by far more than rounding.
    """
    _, group_scores, masked = _selection(hidden, gate_weight, expert_bias, n_group, topk_group)
    groups = group_scores.sort(dim=-1, descending=True).values
    inf = torch.full_like(groups[:, 0], float("inf"))
    per_group = min(2, masked.shape[-1] // n_group)
    group_gap = groups[:, topk_group - 1] - groups[:, topk_group] if topk_group < n_group else inf
    k = num_experts_per_tok
    best = masked.topk(min(k + 1, masked.shape[-1]), dim=-1).values
    expert_gap = best[:, k - 1] - best[:, k] if best.shape[-1] > k else inf
    return torch.minimum(group_gap / (2 * per_group), expert_gap / 2)


def _selection(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor | None,
    n_group: int,
    topk_group: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route`'s steps 1-3: scores `p` `[T, E]`, group scores `[T, n_group]`, and the selection scores with the
    dropped groups at -inf `[T, E]`."""
    dtype = compute_dtype(ROUTER_DTYPE, hidden.dtype)
    scores = torch.sigmoid(router_logits(hidden, gate_weight))
    choice = scores if expert_bias is None else scores + expert_bias.to(dtype)
    T, E = choice.shape
    grouped = choice.reshape(T, n_group, E // n_group)
    group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)  # [T, n_group]
    keep_groups = _stable_topk_indices(group_scores, topk_group)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    masked = grouped.masked_fill(~group_mask[..., None], float("-inf")).reshape(T, E)
    return scores, group_scores, masked


def moe_combine(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
) -> torch.Tensor:
    """`sum_slot w[t, slot] * expert[ids[t, slot]](x[t])`, summed in fp32 in a fixed (token, slot) order.

    Each expert runs once on all of its tokens; results are placed by (token, slot) and reduced over
    slots in order, so the result does not depend on the order experts are visited.

    Returns:
        `[T, D]` in fp32 (float64 for float64 input); the caller casts.
    """
    T, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    rows, outputs = [], []
    for e in torch.unique(flat_ids).tolist():
        rows.append((flat_ids == e).nonzero(as_tuple=True)[0])
        outputs.append(experts[e](x[rows[-1] // k]))
    per_slot = x.new_zeros((T * k, x.shape[-1]))
    if rows:
        per_slot = per_slot.index_copy(0, torch.cat(rows), torch.cat(outputs))
    weighted = per_slot.reshape(T, k, x.shape[-1]).to(topk_weights.dtype) * topk_weights[..., None]
    return weighted.sum(1)
