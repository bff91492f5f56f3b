"""Aligned mode's experts (`ops.moe.aligned`): against float64, a token's bits alone and in any batch, the shim's
steps equal to the engine's op bit for bit, and the standard gradient."""

import pytest
import torch

from common_kernels.ops.moe import aligned
from common_kernels.ops.moe.aligned import (
    aligned_expert_outputs,
    aligned_moe,
    combine_slots,
    every_token,
    expert_blocks,
    expert_outputs,
    stack_experts,
)
from common_kernels.ops.moe.naive import moe_combine, swiglu_mlp
from common_kernels.ops.moe.select import aligned_route
from common_kernels.testing import assert_rel_rms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_experts(E, D, I, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gate, up, down = (
        [(torch.randn(*shape, generator=g) * 0.2).to(dtype) for _ in range(E)] for shape in [(I, D), (I, D), (D, I)]
    )
    return gate, up, down


def reference(x, ids, weights, gate, up, down):
    """`naive.moe_combine` in float64."""
    experts = [
        lambda h, e=e: swiglu_mlp(h, gate[e].double(), up[e].double(), down[e].double()) for e in range(len(gate))
    ]
    return moe_combine(x.double(), ids, weights.double(), experts)


def random_routing(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = (
        torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        if T
        else torch.zeros(0, k, dtype=torch.long)
    )
    return ids, torch.rand(T, k, generator=g) + 0.1


def run(x, ids, weights, gate, up, down):
    with torch.no_grad():
        w13, w2 = stack_experts([t.to(DEVICE) for t in gate], [t.to(DEVICE) for t in up], [t.to(DEVICE) for t in down])
        return aligned_expert_outputs(x.to(DEVICE), w13, w2, ids.to(DEVICE), weights.to(DEVICE)).cpu()


@pytest.mark.parametrize(
    "T,E,k,D,I",
    [(0, 4, 2, 32, 16), (1, 4, 2, 32, 16), (19, 8, 2, 40, 24), (37, 6, 3, 72, 80), (150, 3, 2, 40, 24),
     (20, 4, 2, 128, 128), (9, 3, 2, 128, 64)],  # whole tiles (unmasked loads), and whole tiles in one GEMM only
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swap_ab", [False, True], ids=["tiles", "transposed tiles"])
def test_aligned_experts_match_float64(T, E, k, D, I, dtype, swap_ab, monkeypatch):
    """No tokens, one token, ragged counts per expert (some unused), hidden and expert widths that are or are not
    whole tiles, an expert's rows over more than one block (150 tokens); the tiles as they are and transposed."""
    if swap_ab:
        monkeypatch.setattr(aligned, "TILE_SCHEDULE", ((None, aligned.ExpertTiles(16, 64, 64, swap_ab=True)),))
    gate, up, down = make_experts(E, D, I, dtype, seed=T + E)
    x = torch.randn(T, D).to(dtype)
    ids, weights = random_routing(T, E, k, seed=T)
    out = run(x, ids, weights, gate, up, down)
    assert out.dtype == torch.float32 and out.shape == (T, D)
    # fp32: exact products; bf16: the gate, up and SwiGLU values are rounded to bf16 (as F.linear's would be)
    assert_rel_rms(
        "aligned experts", reference(x, ids, weights, gate, up, down), out, 1e-6 if dtype == torch.float32 else 2e-2
    )


def test_every_pair_lands_once_in_a_block_of_its_own_expert():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [3, 0]])
    pair_of_row, expert_of_block = expert_blocks(ids, num_experts=5, block_m=2)
    assert pair_of_row.numel() % 2 == 0 and expert_of_block.numel() == pair_of_row.numel() // 2
    flat = ids.reshape(-1)
    live = pair_of_row >= 0
    assert sorted(pair_of_row[live].tolist()) == list(range(flat.numel()))
    rows = live.nonzero()[:, 0]
    assert torch.equal(expert_of_block[rows // 2], flat[pair_of_row[rows]])
    assert (expert_of_block[~live.view(-1, 2).any(1)] == 5).all()  # blocks with no pair: past the end


@pytest.mark.parametrize(
    "T,E,k,block_m", [(1, 8, 2, 16), (37, 6, 3, 16), (64, 256, 8, 16), (200, 3, 2, 128), (256, 256, 8, 16)]
)  # a decode step of Ring-mini's 64 tokens, and 256 tokens: 2,048 pairs, the one-launch path's last size
def test_a_decode_steps_blocks_in_one_launch_equal_the_sorted_layout(T, E, k, block_m, monkeypatch):
    """The one-launch layout (up to `ONE_LAUNCH_MAX_PAIRS` pairs, one to 32 programs here) is the sorted path's,
    entry for entry, written over buffers that hold stale values (as a reused allocation does): every padding row
    and every block must be written."""
    from common_kernels.ops.moe.aligned import ONE_LAUNCH_MAX_PAIRS, _sorted_blocks

    assert T * k <= ONE_LAUNCH_MAX_PAIRS
    ids, _ = random_routing(T, E, k, seed=T + E)
    want = _sorted_blocks(ids, E, block_m)
    full = torch.full
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: full(shape, 7777, **kw))
    for one_launch, sorted_ in zip(expert_blocks(ids, E, block_m), want, strict=True):
        assert one_launch.dtype == sorted_.dtype and torch.equal(one_launch, sorted_)


@pytest.mark.parametrize("T", [0, 1, 15, 16, 17, 64, 130])
@pytest.mark.parametrize("block_m", [16, 128])
def test_one_experts_blocks_skip_the_sort_and_equal_the_sorted_layout(T, block_m):
    """The shared expert's layout (one expert, no sort) is the sorted path's, entry for entry."""
    from common_kernels.ops.moe.aligned import _sorted_blocks

    ids = torch.zeros(T, 1, dtype=torch.long)
    for fast, general in zip(expert_blocks(ids, 1, block_m), _sorted_blocks(ids, 1, block_m), strict=True):
        assert fast.dtype == general.dtype and torch.equal(fast, general)


def test_a_tokens_experts_do_not_depend_on_the_batch():
    """A token alone, first, last or in the middle of a batch, with other tokens on its experts or not: same bits."""
    E, D, I, k = 3, 48, 40, 2  # 200 tokens: about 130 rows per expert, three blocks each
    gate, up, down = make_experts(E, D, I, torch.bfloat16, seed=3)
    x = torch.randn(200, D).bfloat16()
    ids, weights = random_routing(200, E, k, seed=4)
    alone = run(x[40:41], ids[40:41], weights[40:41], gate, up, down)
    for rows in [slice(40, 41), slice(0, 200), slice(40, 200), slice(23, 58), slice(39, 41)]:
        together = run(x[rows], ids[rows], weights[rows], gate, up, down)
        assert torch.equal(together[40 - rows.start], alone[0]), rows


@pytest.mark.parametrize("T,k,D", [(0, 8, 64), (1, 1, 1), (5, 8, 513), (37, 3, 1030)])
def test_combine_slots_sums_each_tokens_slots_and_nothing_else(T, k, D):
    """Against float64, ragged widths past one tile; a token's bits alone equal its bits in the batch."""
    g = torch.Generator().manual_seed(T + k + D)
    y = torch.randn(T, k, D, generator=g).to(DEVICE)
    w = torch.rand(T, k, generator=g).to(DEVICE)
    out = combine_slots(y, w)
    assert out.shape == (T, D) and out.dtype == torch.float32
    expected = (y.double() * w.double()[..., None]).sum(1)
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-6)
    for t in range(min(T, 3)):
        assert torch.equal(combine_slots(y[t : t + 1], w[t : t + 1])[0], out[t])


@pytest.mark.parametrize("Is", [24, 16], ids=["shared expert apart", "shared expert in the routed launch"])
def test_the_shims_steps_equal_the_engines_op_bit_for_bit(Is, monkeypatch):
    """`MoE.forward(aligned=True)`'s sequence (route, routed experts, shared expert, with autograd on) against
    the engine's `aligned_moe` on stacked weights, which runs a shared expert of the routed experts' width as one
    more expert in their launch (and the same bits: its slot is summed last, with weight 1)."""
    E, D, I, k = 8, 32, 16, 2
    merged = []
    real = aligned._expert_outputs
    monkeypatch.setattr(aligned, "_expert_outputs", lambda *a: merged.append(len(a) > 5) or real(*a))
    g = torch.Generator().manual_seed(5)
    gate, up, down = make_experts(E, D, I, torch.bfloat16, seed=6)
    shared = make_experts(1, D, Is, torch.bfloat16, seed=7)
    gate_w, bias = torch.randn(E, D, generator=g) * 0.2, torch.randn(E, generator=g) * 0.1
    x = torch.randn(21, D, generator=g).bfloat16()
    params = [t.clone().requires_grad_() for t in (*gate, *up, *down)]
    ids, w = aligned_route(x, gate_w.requires_grad_(), bias, k, 4, 2, 2.5, True)
    shim = expert_outputs(x, ids, w, params[:E], params[E : 2 * E], params[2 * E :])
    shim = (shim + expert_outputs(x, *every_token(x), *shared)).to(x.dtype)
    with torch.no_grad():
        engine = aligned_moe(
            x, gate_w.detach(), bias, *stack_experts(gate, up, down), *stack_experts(*shared), k, 4, 2, 2.5, True
        )
    assert shim.requires_grad and torch.equal(shim.detach(), engine)
    assert any(merged) == (Is == I)


def test_aligned_experts_take_the_standard_gradient():
    E, D, I, k, T = 4, 24, 16, 2, 11
    gate, up, down = make_experts(E, D, I, torch.float32, seed=8)
    x = torch.randn(T, D, requires_grad=True)
    ids, weights = random_routing(T, E, k, seed=9)
    weights.requires_grad_()
    params = [t.clone().requires_grad_() for t in (*gate, *up, *down)]
    dy = torch.randn(T, D)
    leaves = [x, weights, *params]
    got = torch.autograd.grad(
        (expert_outputs(x, ids, weights, params[:E], params[E : 2 * E], params[2 * E :]) * dy).sum(), leaves
    )
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rw, rp = ref_leaves[0], ref_leaves[1], ref_leaves[2:]
    want = torch.autograd.grad(
        (reference(rx, ids, rw, rp[:E], rp[E : 2 * E], rp[2 * E :]) * dy.double()).sum(), ref_leaves
    )
    for n, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_rel_rms(f"gradient {n}", b, a, 1e-5)


def test_aligned_experts_refuse_mismatched_inputs():
    x = torch.randn(3, 8)
    w13, w2 = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    ids, weights = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(ValueError, match=r"w13 \(2, 8, 8\) and w2 \(2, 8, 3\) must be \[E, 2I, D\], \[E, D, I\]"):
        aligned_expert_outputs(x, w13, torch.randn(2, 8, 3), ids, weights)
    with pytest.raises(ValueError, match=r"topk_ids \(3, 1\), topk_weights \(3, 2\): both \[3, k\]"):
        aligned_expert_outputs(x, w13, w2, ids, torch.ones(3, 2))
    with pytest.raises(ValueError, match="must share one dtype"):
        aligned_expert_outputs(x.bfloat16(), w13, w2, ids, weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_aligned_experts_on_a_gpu_are_batch_invariant_at_ring_mini_size():
    """Ring-mini's experts (256 of 2,048 -> 512, 8 per token) in bf16 on the tensor cores: token 0's bits for 1 to
    12,000 tokens (every set of `TILE_SCHEDULE`, each side of its boundaries), and its accuracy against float64."""
    E, D, I, k = 256, 2048, 512, 8
    g = torch.Generator().manual_seed(10)
    w13 = (torch.randn(E, 2 * I, D, generator=g) * 0.02).bfloat16().cuda()
    w2 = (torch.randn(E, D, I, generator=g) * 0.02).bfloat16().cuda()
    x = torch.randn(12000, D, generator=g).bfloat16().cuda()
    ids, weights = (t.cuda() for t in random_routing(12000, E, k, seed=11))
    with torch.no_grad():
        alone = aligned_expert_outputs(x[:1], w13, w2, ids[:1], weights[:1])
        for rows in [2, 17, 300, 1024, 1025, 4096, 8192, 8193, 12000]:
            got = aligned_expert_outputs(x[:rows], w13, w2, ids[:rows], weights[:rows])
            assert torch.equal(got[0], alone[0]), rows
    gate, up = w13[:, :I].cpu(), w13[:, I:].cpu()
    want = reference(x[:16].cpu(), ids[:16].cpu(), weights[:16].cpu(), gate, up, w2.cpu())
    assert_rel_rms("aligned experts at Ring-mini size", want, got[:16].cpu(), 2e-2)


@pytest.mark.parametrize("itemsize", [2, 4], ids=["bf16", "fp32"])
@pytest.mark.parametrize("swiglu", [True, False], ids=["gate and up", "down"])
def test_each_tile_sets_pipeline_fits_shared_memory(itemsize, swiglu):
    """bf16 keeps each set's own depth; fp32 operands lower it until the stages fit (Hopper's 227 KiB here)."""
    cpu = torch.device("cpu")
    for _, tiles in aligned.TILE_SCHEDULE:
        stages = aligned.fitting_stages(tiles, itemsize, swiglu, cpu)
        per_stage = (tiles.block_m + (2 if swiglu else 1) * tiles.block_n) * tiles.block_k * itemsize
        assert 1 <= stages <= tiles.num_stages and stages * per_stage <= 232448, tiles
        if itemsize == 2:
            assert stages == tiles.num_stages, tiles
    wide = aligned.ExpertTiles(64, 128, 64, num_stages=4)
    assert aligned.fitting_stages(wide, 4, True, cpu) == 2  # 80 KiB a stage


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 64, 1500, 9000])  # each tile set
def test_the_shared_expert_in_the_routed_launch_keeps_the_bits_on_a_gpu(T):
    """Ring-mini's MoE (256 experts of 2,048 -> 512, 8 a token, one shared expert of the same width) in bf16:
    `aligned_moe`, which runs the shared expert in the routed experts' launches, equals the routed and the shared
    experts summed apart (the shim's steps), bit for bit."""
    E, D, I, k = 256, 2048, 512, 8
    g = torch.Generator().manual_seed(14)
    w13 = (torch.randn(E, 2 * I, D, generator=g) * 0.02).bfloat16().cuda()
    w2 = (torch.randn(E, D, I, generator=g) * 0.02).bfloat16().cuda()
    shared_w13 = (torch.randn(1, 2 * I, D, generator=g) * 0.02).bfloat16().cuda()
    shared_w2 = (torch.randn(1, D, I, generator=g) * 0.02).bfloat16().cuda()
    gate = (torch.randn(E, D, generator=g) * 0.02).cuda()
    bias = (torch.randn(E, generator=g) * 0.01).cuda()
    x = torch.randn(T, D, generator=g).bfloat16().cuda()
    with torch.no_grad():
        together = aligned_moe(x, gate, bias, w13, w2, shared_w13, shared_w2, k, 8, 4, 2.5, True)
        ids, weights = aligned_route(x, gate, bias, k, 8, 4, 2.5, True)
        routed = aligned_expert_outputs(x, w13, w2, ids, weights)
        apart = (routed + aligned_expert_outputs(x, shared_w13, shared_w2, *every_token(x))).to(x.dtype)
    assert torch.equal(together, apart)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_aligned_experts_in_fp32_launch_at_every_tile_set_on_a_gpu():
    """fp32 experts (an fp32 engine's, the tiny model's dense layers) at Ring-mini's widths, 8 experts: one batch in
    each set of `TILE_SCHEDULE` launches (the wide sets' pipelines are cut to fit shared memory) and keeps token 0's
    bits."""
    E, D, I, k = 8, 2048, 512, 2
    g = torch.Generator().manual_seed(12)
    w13 = (torch.randn(E, 2 * I, D, generator=g) * 0.02).cuda()
    w2 = (torch.randn(E, D, I, generator=g) * 0.02).cuda()
    x = torch.randn(8193, D, generator=g).cuda()
    ids, weights = (t.cuda() for t in random_routing(8193, E, k, seed=13))
    with torch.no_grad():
        alone = aligned_expert_outputs(x[:1], w13, w2, ids[:1], weights[:1])
        for rows in [1025, 8193]:
            assert torch.equal(aligned_expert_outputs(x[:rows], w13, w2, ids[:rows], weights[:rows])[0], alone[0])
    want = reference(x[:1].cpu(), ids[:1].cpu(), weights[:1].cpu(), w13[:, :I].cpu(), w13[:, I:].cpu(), w2.cpu())
    assert_rel_rms("fp32 aligned experts", want, alone.cpu(), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 64, 256])
def test_a_decode_steps_blocks_in_one_launch_on_a_gpu_equal_the_sorted_layout(T):
    """The one-program layout compiled for the GPU, at Ring-mini's routing (256 experts, 8 per token, decode tiles)."""
    from common_kernels.ops.moe.aligned import _sorted_blocks

    ids = random_routing(T, 256, 8, seed=T)[0].cuda()
    for one_launch, sorted_ in zip(expert_blocks(ids, 256, 16), _sorted_blocks(ids, 256, 16), strict=True):
        assert torch.equal(one_launch, sorted_)


def test_an_engines_first_launch_compiles_every_expert_tier_its_steps_can_take(monkeypatch):
    """After `warm_up_expert_tiers(max_tokens)`, a layer shape's first launch also runs (on zero rows) the first size
    of each tier up to `max_tokens`, once; the shim's default runs nothing extra. Outputs are the plain call's."""
    from common_kernels.serving import warm_up_expert_tiers

    tiles = aligned.TILE_SCHEDULE[-1][1]
    monkeypatch.setattr(aligned, "TILE_SCHEDULE", ((2, tiles), (5, tiles), (None, tiles)))
    monkeypatch.setattr(aligned, "WARM_UP_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(aligned, "_warmed_shapes", set())
    monkeypatch.setattr(aligned, "_warm_up_max_tokens", None)
    assert aligned.tier_first_sizes() == [1, 3, 6]
    sizes, plain = [], aligned._expert_outputs

    def spy(x, *args):
        sizes.append(x.shape[0])
        return plain(x, *args)

    monkeypatch.setattr(aligned, "_expert_outputs", spy)
    E, k, D, I = 4, 2, 32, 16
    w13, w2 = (t.to(DEVICE) for t in stack_experts(*make_experts(E, D, I, torch.float32, seed=3)))
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ids, weights = (t.to(DEVICE) for t in random_routing(7, E, k, seed=6))
    want = aligned_expert_outputs(x, w13, w2, ids, weights)
    assert sizes == [7]  # no engine set a step size: nothing ahead
    warm_up_expert_tiers(4)  # steps of up to 4 tokens: the tiers starting at 1 and 3
    got = aligned_expert_outputs(x, w13, w2, ids, weights)
    again = aligned_expert_outputs(x[:1], w13, w2, ids[:1], weights[:1])
    assert sizes == [7, 7, 1, 3, 1] and torch.equal(got, want) and torch.equal(again[0], want[0])
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        warm_up_expert_tiers(0)
