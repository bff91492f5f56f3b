import pytest
import torch

from common_kernels.ops.moe.naive import moe_combine, route, selection_margin, swiglu_mlp
from common_kernels.testing import assert_rel_rms


def brute_force_route(x, w, bias, k, n_group, topk_group, scaling, normalise):
    """Token by token, in Python: the spec's steps 1-5 with ties to the lower index."""
    E = w.shape[0]
    size = E // n_group
    ids, weights = [], []
    for t in range(x.shape[0]):
        p = [1 / (1 + torch.exp(-(x[t].double() @ w[e].double()))).item() for e in range(E)]
        sel = [p[e] + (0.0 if bias is None else bias[e].item()) for e in range(E)]
        group_score = [sum(sorted(sel[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
        allowed = [e for e in range(E) if e // size in groups]
        chosen = sorted(allowed, key=lambda e: (-sel[e], e))[:k]
        pw = [p[e] for e in chosen]
        total = sum(pw) + 1e-20 if normalise else 1.0
        ids.append(chosen)
        weights.append([v / total * scaling for v in pw])
    return torch.tensor(ids), torch.tensor(weights, dtype=torch.float64)


@pytest.mark.parametrize("E,n_group,topk_group,k", [(8, 4, 2, 2), (16, 4, 1, 3), (12, 1, 1, 4), (256, 8, 4, 8)])
@pytest.mark.parametrize("with_bias,normalise", [(True, True), (False, True), (True, False)])
def test_route_matches_brute_force(E, n_group, topk_group, k, with_bias, normalise):
    x, w = torch.randn(5, 16, dtype=torch.float64), torch.randn(E, 16, dtype=torch.float64)
    bias = torch.randn(E, dtype=torch.float64) * 0.3 if with_bias else None
    ids, weights = route(x, w, bias, k, n_group, topk_group, 2.5, normalise)
    ref_ids, ref_w = brute_force_route(x, w, bias, k, n_group, topk_group, 2.5, normalise)
    assert torch.equal(ids, ref_ids)
    assert_rel_rms("weights", ref_w, weights, 1e-14)


def test_bias_chooses_but_never_weights():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 0.0, 100.0], dtype=torch.float64)  # forces expert 3 in
    ids, weights = route(x, w, bias, 2, 1, 1, 1.0, False)
    assert (ids[:, 0] == 3).all()
    assert torch.allclose(weights[:, 0], torch.sigmoid(x @ w[3]))


def test_router_runs_in_fp32_from_bf16_and_ties_go_to_the_lower_index():
    x, w = torch.randn(4, 8).bfloat16(), torch.zeros(6, 8).bfloat16()  # all scores tie at 0.5
    ids, weights = route(x, w, None, 3, 2, 2, 1.0, True)
    assert weights.dtype == torch.float32
    assert ids.tolist() == [[0, 1, 2]] * 4
    assert torch.allclose(weights, torch.full_like(weights, 1 / 3))


@pytest.mark.parametrize("E,n_group,topk_group,k", [(8, 4, 2, 2), (16, 4, 1, 3), (12, 1, 1, 4), (32, 4, 4, 32)])
def test_no_change_of_the_scores_within_the_selection_margin_changes_the_experts(E, n_group, topk_group, k):
    torch.manual_seed(E + k)
    x, w = torch.randn(6, 16, dtype=torch.float64), torch.randn(E, 16, dtype=torch.float64)
    bias = torch.randn(E, dtype=torch.float64) * 0.1
    ids, _ = route(x, w, bias, k, n_group, topk_group, 1.0, True)
    margin = selection_margin(x, w, bias, k, n_group, topk_group)
    assert margin.shape == (6,) and (margin > 0).all()
    assert torch.isinf(margin).all() == (topk_group == n_group and k == E)  # all chosen: nothing can change
    for t in range(6):
        for _ in range(50):
            nudge = (torch.rand(E, dtype=torch.float64) * 2 - 1) * 0.999 * margin[t].clamp(max=1.0)
            moved, _ = route(x[t : t + 1], w, bias + nudge, k, n_group, topk_group, 1.0, True)
            assert set(moved[0].tolist()) == set(ids[t].tolist())


def test_the_selection_margin_is_tight_for_experts_and_zero_at_a_tie():
    torch.manual_seed(0)
    x, w = torch.randn(4, 16, dtype=torch.float64), torch.randn(10, 16, dtype=torch.float64)
    ids, _ = route(x, w, None, 3, 1, 1, 1.0, True)
    margin = selection_margin(x, w, None, 3, 1, 1)
    for t in range(4):  # the best unchosen expert raised and the last chosen lowered by just over the margin swap
        scores = torch.sigmoid(x[t] @ w.T)
        last = min(ids[t].tolist(), key=lambda e: scores[e].item())
        best_out = max(set(range(10)) - set(ids[t].tolist()), key=lambda e: scores[e].item())
        bias = torch.zeros(10, dtype=torch.float64)
        bias[best_out], bias[last] = margin[t] * 1.001, -margin[t] * 1.001
        moved, _ = route(x[t : t + 1], w, bias, 3, 1, 1, 1.0, True)
        assert best_out in moved[0].tolist() and last not in moved[0].tolist()
    tied = torch.cat([w[:3], w[2:3], w[4:]])  # experts 2 and 3 score alike for every token
    chosen_one_of_the_pair = route(x, tied, None, 3, 1, 1, 1.0, True)[0]
    straddles = [(2 in row) != (3 in row) for row in chosen_one_of_the_pair.tolist()]
    assert any(straddles)
    assert (selection_margin(x, tied, None, 3, 1, 1)[torch.tensor(straddles)] == 0).all()


def test_moe_combine_matches_per_token_loop():
    T, D, E, k = 9, 8, 5, 2
    x = torch.randn(T, D, dtype=torch.float64)
    experts = [torch.nn.Linear(D, D, bias=False).double() for _ in range(E)]
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    weights = torch.rand(T, k, dtype=torch.float64)
    ref = torch.stack([sum(weights[t, s] * experts[ids[t, s]](x[t]) for s in range(k)) for t in range(T)])
    assert_rel_rms("combine", ref, moe_combine(x, ids, weights, experts), 1e-14)


def test_swiglu():
    x = torch.randn(3, 4, dtype=torch.float64)
    g, u, d = (
        torch.randn(6, 4, dtype=torch.float64),
        torch.randn(6, 4, dtype=torch.float64),
        torch.randn(4, 6, dtype=torch.float64),
    )
    a = x @ g.T
    assert_rel_rms("swiglu", (a / (1 + torch.exp(-a)) * (x @ u.T)) @ d.T, swiglu_mlp(x, g, u, d), 1e-14)


def test_the_bf16x3_split_sums_to_the_fp32_weight():
    from common_kernels.ops.moe.router_gemm import split_bf16x3

    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3)) * 0.02
    parts = split_bf16x3(w)
    assert parts.dtype == torch.bfloat16 and parts.shape == (24, 32)
    total = parts[:8].double() + parts[8:16].double() + parts[16:].double()
    assert ((total - w.double()).abs() <= w.double().abs() * 2**-24).all()


@pytest.mark.parametrize("products", ["fp32", "bf16x3"])
def test_router_logits_are_fp32_accurate_either_way(monkeypatch, products):
    """bf16 activations against an fp32 weight: both settings within fp32 rounding of float64; bf16x3 reaches its
    own path only without autograd (its casts would round the weight's gradient to bf16)."""
    from common_kernels.ops.moe import router_gemm

    monkeypatch.setattr(router_gemm, "ROUTER_PRODUCTS", products)
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(5, 64, generator=g).bfloat16(), torch.randn(16, 64, generator=g) * 0.05
    calls = []
    real_split = router_gemm.split_bf16x3
    monkeypatch.setattr(router_gemm, "split_bf16x3", lambda weight: calls.append(1) or real_split(weight))
    with torch.no_grad():
        logits = router_gemm.router_logits(x, w)
    assert logits.dtype == torch.float32
    assert_rel_rms("router logits", x.double() @ w.double().t(), logits, 1e-6)
    assert len(calls) == (products == "bf16x3")
    w.requires_grad_()
    router_gemm.router_logits(x, w).sum().backward()  # the fp32 GEMM: an fp32 gradient
    assert len(calls) == (products == "bf16x3") and w.grad.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16x3_router_logits_on_a_gpu_are_fp32_accurate(monkeypatch):
    """The tensor-core path (bf16 x bf16 -> fp32 `torch.mm`) at Ring-mini's router shape.

    The products are exact; the tensor cores' fp32 sums land at about 2e-6 relative RMS against float64 (RESULTS.md
    run O), so the bound is 2**-16: far below what a rounded weight (bf16: 2**-9) or TF32 products (2**-11) give."""
    from common_kernels.ops.moe import router_gemm

    monkeypatch.setattr(router_gemm, "ROUTER_PRODUCTS", "bf16x3")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8192, 2048, generator=g).bfloat16().cuda()
    w = (torch.randn(256, 2048, generator=g) * 0.02).cuda()
    with torch.no_grad():
        logits = router_gemm.router_logits(x, w)
    assert_rel_rms("bf16x3 router logits", x.double() @ w.double().t(), logits, 2.0**-16)


# ----- aligned mode's router GEMM: fixed tiles, exact fp32 products, a row's bits independent of the batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("T,D,E", [(0, 64, 8), (1, 64, 8), (17, 40, 72), (33, 96, 256)])
@pytest.mark.parametrize(
    "dtype, weight_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)  # the router (fp32 weight), and an aligned LM head (bf16 weight: the tensor-core path on a GPU)
def test_invariant_router_logits_match_float64(T, D, E, dtype, weight_dtype):
    """Ragged rows, a hidden size that is not a whole number of tiles, experts beyond one tile, no rows at all."""
    from common_kernels.ops.moe.router_gemm import router_logits

    g = torch.Generator().manual_seed(T + D + E)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = (torch.randn(E, D, generator=g) * 0.05).to(weight_dtype)
    with torch.no_grad():
        logits = router_logits(x.to(DEVICE), w.to(DEVICE), invariant=True).cpu()
    assert logits.dtype == torch.float32 and logits.shape == (T, E)
    if T:
        assert_rel_rms("invariant router logits", x.double() @ w.double().t(), logits, 1e-6)


def test_invariant_router_logits_of_a_row_do_not_depend_on_the_batch():
    """The property aligned mode needs: a row alone, first, last or in the middle of 1-300 rows, the same bits."""
    from common_kernels.ops.moe.router_gemm import router_logits

    g = torch.Generator().manual_seed(6)
    batch = torch.randn(300, 96, generator=g).to(DEVICE)
    w = (torch.randn(72, 96, generator=g) * 0.05).to(DEVICE)
    with torch.no_grad():
        alone = router_logits(batch[123:124], w, invariant=True)
        for rows in [slice(123, 124), slice(120, 137), slice(0, 300), slice(123, 300), slice(100, 124)]:
            together = router_logits(batch[rows], w, invariant=True)
            assert torch.equal(together[123 - rows.start], alone[0]), rows


def test_invariant_router_logits_take_the_plain_gradient():
    """Aligned forward, standard backward: the gradients equal the fp32 GEMM's."""
    from common_kernels.ops.moe.router_gemm import router_logits

    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 40, generator=g, requires_grad=True)
    w = (torch.randn(24, 40, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(9, 24, generator=g)
    (router_logits(x.to(DEVICE), w.to(DEVICE), invariant=True) * dy.to(DEVICE)).sum().backward()
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (router_logits(x2, w2) * dy.double()).sum().backward()
    assert_rel_rms("dx", x2.grad, x.grad, 1e-6)
    assert_rel_rms("dw", w2.grad, w.grad, 1e-6)


def test_the_router_tiles_follow_the_batch_on_a_gpu_and_not_in_the_interpreter(monkeypatch):
    from common_kernels.ops.moe import router_gemm

    monkeypatch.setattr(router_gemm, "INTERPRET", False)
    most = router_gemm.SPLIT_WEIGHT_DECODE_MAX_ROWS
    assert router_gemm.invariant_router_tiles(most, split_weight=True) == router_gemm.SPLIT_WEIGHT_DECODE_TILES
    assert router_gemm.invariant_router_tiles(most + 1, split_weight=True) == router_gemm.SPLIT_WEIGHT_TILES
    most = router_gemm.TENSOR_CORE_DECODE_MAX_ROWS
    assert router_gemm.invariant_router_tiles(most, tensor_cores=True) == router_gemm.TENSOR_CORE_DECODE_TILES
    assert router_gemm.invariant_router_tiles(most + 1, tensor_cores=True) == router_gemm.TENSOR_CORE_TILES
    monkeypatch.setattr(router_gemm, "INTERPRET", True)
    assert router_gemm.invariant_router_tiles(1, split_weight=True) == router_gemm.SPLIT_WEIGHT_TILES


def test_invariant_router_logits_refuse_mismatched_shapes():
    from common_kernels.ops.moe.router_gemm import router_logits

    with pytest.raises(ValueError, match=r"hidden states \(4, 64\) and gate weight \(8, 32\)"):
        router_logits(torch.randn(4, 64, device=DEVICE), torch.randn(8, 32, device=DEVICE), invariant=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_invariant_router_logits_on_a_gpu_are_batch_invariant_at_ring_mini_size():
    """Ring-mini's router (2,048 -> 256, bf16 activations: the split-weight tensor-core path) for 1 to 8,192 rows
    (each side of the decode tiles' boundary):
    row 0's bits never move; cuBLAS's fp32 GEMM is printed beside it for the record (it picks kernels by row
    count)."""
    from common_kernels.ops.moe.router_gemm import router_logits

    g = torch.Generator().manual_seed(8)
    x = torch.randn(8192, 2048, generator=g).bfloat16().cuda()
    w = (torch.randn(256, 2048, generator=g) * 0.02).cuda()
    with torch.no_grad():
        alone = router_logits(x[:1], w, invariant=True)
        plain_alone = router_logits(x[:1], w)
        plain_moved = []
        for rows in [2, 5, 16, 17, 300, 1024, 1025, 2048, 8192]:
            assert torch.equal(router_logits(x[:rows], w, invariant=True)[0], alone[0]), rows
            plain_moved += [rows] if not torch.equal(router_logits(x[:rows], w)[0], plain_alone[0]) else []
        reference = x[:64].double() @ w.double().t()
        # exact products, fp32 sums on the tensor cores: about 2.1e-6, as the aligned LM head's (run T)
        assert_rel_rms("invariant router logits", reference, router_logits(x[:64], w, invariant=True), 2**-16)
    print(f"\ncuBLAS fp32 router GEMM: row 0 changed bits at {plain_moved or 'no'} row counts")  # noqa: T201


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_aligned_lm_head_on_the_tensor_cores_is_batch_invariant():
    """A bf16 LM head (2,048 -> 32,768 of Ring-mini's 157,184 rows) through the same op: row 0's bits for 1 to 8,192
    rows, and fp32 accuracy (exact products, fp32 sums) against float64."""
    from common_kernels.ops.moe.router_gemm import router_logits

    g = torch.Generator().manual_seed(9)
    x = torch.randn(8192, 2048, generator=g).bfloat16().cuda()
    w = (torch.randn(32768, 2048, generator=g) * 0.02).bfloat16().cuda()
    with torch.no_grad():
        alone = router_logits(x[:1], w, invariant=True)
        for rows in [2, 17, 64, 65, 129, 300, 1024, 1025, 8192]:  # each side of the decode tiles' boundary
            assert torch.equal(router_logits(x[:rows], w, invariant=True)[0], alone[0]), rows
        reference = x[:64].double() @ w.double().t()
        # exact bf16 products summed by the tensor cores: 2.1e-6 measured (run T), as for the bf16x3 router
        assert_rel_rms("aligned LM head logits", reference, router_logits(x[:64], w, invariant=True), 2**-16)
