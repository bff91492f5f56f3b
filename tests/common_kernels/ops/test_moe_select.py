"""Aligned mode's expert selection (`ops.moe.select`) against `naive.route`: the same experts in the same order,
weights to fp32 rounding, ties to the lower index, a token's bits alone and in any batch, the route's gradient,
and bad inputs named."""

import pytest
import torch
import torch.nn.functional as F

from common_kernels.ops.moe.naive import route
from common_kernels.ops.moe.select import aligned_route, select_experts
from common_kernels.testing import assert_rel_rms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "E,n_group,topk_group,k", [(8, 4, 2, 2), (16, 4, 1, 3), (12, 1, 1, 4), (12, 12, 3, 2), (256, 8, 4, 8)]
)  # groups of one expert, one group, a non-power-of-two expert count, Ring-mini's shape
@pytest.mark.parametrize("with_bias,normalise", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_the_selection_chooses_as_the_route_does(T, E, n_group, topk_group, k, with_bias, normalise):
    g = torch.Generator().manual_seed(T + E + k)
    x, w = torch.randn(T, 16, generator=g), torch.randn(E, 16, generator=g)
    bias = torch.randn(E, generator=g) * 0.3 if with_bias else None
    ids, weights = route(x, w, bias, k, n_group, topk_group, 2.5, normalise)
    got_ids, got_weights = select_experts(
        F.linear(x, w).to(DEVICE), None if bias is None else bias.to(DEVICE), k, n_group, topk_group, 2.5, normalise
    )
    assert got_ids.dtype == torch.int64 and got_weights.dtype == torch.float32
    assert torch.equal(got_ids.cpu(), ids)
    if T:
        assert_rel_rms("selected weights", weights.double(), got_weights.cpu(), 1e-6)


def test_a_shared_slot_adds_expert_e_with_weight_one_and_changes_nothing_else():
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(19, 16, generator=g).to(DEVICE), torch.randn(256, 16, generator=g).to(DEVICE)
    bias = (torch.randn(256, generator=g) * 0.1).to(DEVICE)
    ids, weights = aligned_route(x, w, bias, 8, 8, 4, 2.5, True)
    with_shared = aligned_route(x, w, bias, 8, 8, 4, 2.5, True, shared_slot=True)
    assert with_shared[0].shape == (19, 9) and torch.equal(with_shared[0][:, :8], ids)
    assert torch.equal(with_shared[1][:, :8], weights)
    assert (with_shared[0][:, 8] == 256).all() and (with_shared[1][:, 8] == 1.0).all()


def test_ties_go_to_the_lower_index_in_groups_and_experts():
    logits = torch.zeros(3, 8, device=DEVICE)  # every score ties at 0.5
    ids, weights = select_experts(logits, None, 3, 4, 2, 1.0, True)
    assert ids.tolist() == [[0, 1, 2]] * 3
    assert torch.allclose(weights, torch.full_like(weights, 1 / 3))


def test_a_tokens_selection_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(300, 256, generator=g).to(DEVICE), torch.randn(256, generator=g).to(DEVICE) * 0.1
    alone = select_experts(logits[123:124], bias, 8, 8, 4, 2.5, True)
    for rows in [slice(0, 300), slice(120, 137), slice(123, 300)]:
        together = select_experts(logits[rows], bias, 8, 8, 4, 2.5, True)
        assert torch.equal(together[0][123 - rows.start], alone[0][0])
        assert torch.equal(together[1][123 - rows.start], alone[1][0])


def test_the_weights_take_the_routes_gradient():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(9, 16, generator=g), torch.randn(16, 16, generator=g)
    bias, dy = torch.randn(16, generator=g) * 0.1, torch.randn(9, 3, generator=g)
    w1 = w.clone().requires_grad_()
    ids, weights = aligned_route(x.to(DEVICE), w1.to(DEVICE), bias.to(DEVICE), 3, 4, 2, 2.5, True)
    (weights * dy.to(DEVICE)).sum().backward()
    w2 = w.double().requires_grad_()
    ref_ids, ref_weights = route(x.double(), w2, bias.double(), 3, 4, 2, 2.5, True)
    (ref_weights * dy.double()).sum().backward()
    assert torch.equal(ids.cpu(), ref_ids)
    assert_rel_rms("router weight gradient", w2.grad, w1.grad, 1e-5)


def test_the_selection_refuses_what_it_cannot_choose_from():
    with pytest.raises(ValueError, match="logits must be fp32"):
        select_experts(torch.zeros(2, 8, dtype=torch.float64, device=DEVICE), None, 2, 4, 2, 1.0, True)
    with pytest.raises(ValueError, match=r"expert_bias \(4,\) must be \[8\]"):
        select_experts(torch.zeros(2, 8, device=DEVICE), torch.zeros(4, device=DEVICE), 2, 4, 2, 1.0, True)
    with pytest.raises(ValueError, match="n_group 3, topk_group 2, k 2"):
        select_experts(torch.zeros(2, 8, device=DEVICE), None, 2, 3, 2, 1.0, True)
    with pytest.raises(ValueError, match="n_group 4, topk_group 1, k 3"):
        select_experts(torch.zeros(2, 8, device=DEVICE), None, 3, 4, 1, 1.0, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_selection_on_a_gpu_chooses_as_the_route_does_and_is_batch_invariant_at_ring_mini_size():
    """Ring-mini's routing (256 experts, 8 groups, 4 kept, 8 per token) for 1 to 8,192 tokens: token 0's bits never
    move; every token whose choice is not a near-tie (margin above 1e-5) gets the route's experts (the route fed the
    same logits through an identity weight on the CPU, exact in fp32), and the weights agree to fp32 rounding."""
    from common_kernels.ops.moe.naive import selection_margin

    g = torch.Generator().manual_seed(12)
    logits = (torch.randn(8192, 256, generator=g) * 2).cuda()
    bias = (torch.randn(256, generator=g) * 0.05).cuda()
    alone = select_experts(logits[:1], bias, 8, 8, 4, 2.5, True)
    for rows in [2, 17, 300, 8192]:
        ids, weights = select_experts(logits[:rows], bias, 8, 8, 4, 2.5, True)
        assert torch.equal(ids[0], alone[0][0]) and torch.equal(weights[0], alone[1][0]), rows
    logits, bias, ids, weights, identity = logits.cpu(), bias.cpu(), ids.cpu(), weights.cpu(), torch.eye(256)
    ref_ids, ref_weights = route(logits, identity, bias, 8, 8, 4, 2.5, True)
    clear = selection_margin(logits, identity, bias, 8, 8, 4) > 1e-5
    assert clear.float().mean() > 0.9
    assert torch.equal(ids[clear], ref_ids[clear])
    assert_rel_rms("selected weights", ref_weights[clear].double(), weights[clear], 1e-6)
