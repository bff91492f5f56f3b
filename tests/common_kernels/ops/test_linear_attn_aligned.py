"""Aligned (batch-invariant) prefill: right against float64, and bit for bit the same for a sequence alone or in
any batch, in one pass or split on the segment grid (CPU: TRITON_INTERPRET; GPU: the same shapes)."""

import pytest
import torch

from common_kernels.ops.linear_attn.prefill import linear_attention_prefill, plan_prefill
from common_kernels.testing import check_prefill_on_a_stale_pool, ragged_offsets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, K, V, SEG, CHUNK = 2, 16, 32, 32, 16
SCALE = K**-0.5


def qkv(T: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(T, H, d, generator=g).to(DEVICE, dtype) for d in (K, K, V))


RATE = torch.tensor([0.05, 0.6], device=DEVICE)


def prefill(q, k, v, lengths, pool, slots, fresh, aligned=True, segment_size=SEG):
    """The kernel on packed sequences of `lengths`; returns the output, updating `pool` in place."""
    cu = ragged_offsets(lengths).to(DEVICE)
    slots = torch.tensor(slots, device=DEVICE)
    fresh = torch.tensor(fresh, dtype=torch.int8, device=DEVICE)
    return linear_attention_prefill(
        q, k, v, RATE, SCALE, cu, pool, slots, fresh, chunk_size=CHUNK, segment_size=segment_size,
        block_v=16, aligned=aligned,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[37, 0, 1, 80, 16], [32, 64, 33], [1], [0, 0]], ids=str)
def test_aligned_prefill_matches_float64_reference(lengths, dtype):
    q, k, v = qkv(sum(lengths), dtype, 1)
    cu = ragged_offsets(lengths).to(DEVICE)
    check_prefill_on_a_stale_pool(
        lambda pool, slots, fresh: linear_attention_prefill(
            q, k, v, RATE, SCALE, cu, pool, slots, fresh, chunk_size=CHUNK, segment_size=SEG, block_v=16,
            aligned=True,
        ),
        q, k, v, RATE, SCALE, cu,
    )  # fmt: skip


def one_sequence_in(batch_lengths: list[int], index: int, x, dtype, initial, aligned=True, segment_size=SEG):
    """Sequence `x` (q, k, v) at position `index` among random others: its output rows and final state."""
    lengths = list(batch_lengths)
    lengths.insert(index, x[0].shape[0])
    parts = [qkv(n, dtype, 10 + i) for i, n in enumerate(batch_lengths)]
    parts.insert(index, x)
    q, k, v = (torch.cat([p[j] for p in parts]) for j in range(3))
    pool = torch.randn(len(lengths), H, K, V, device=DEVICE)
    pool[index] = initial
    o = prefill(q, k, v, lengths, pool, list(range(len(lengths))), [0] * len(lengths), aligned, segment_size)
    start = sum(lengths[:index])
    return o[start : start + lengths[index]], pool[index]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_sequence_gives_the_same_bits_alone_and_in_any_batch(dtype):
    x = qkv(100, dtype, 2)
    initial = torch.randn(H, K, V, device=DEVICE)
    alone = one_sequence_in([], 0, x, dtype, initial)
    for others, index in [([5, 37], 1), ([0, 200, 1], 0), ([64, 1, 31], 3), ([300], 1)]:
        o, state = one_sequence_in(others, index, x, dtype, initial)
        assert torch.equal(o, alone[0]), f"output differs beside {others}"
        assert torch.equal(state, alone[1]), f"final state differs beside {others}"
    # the default mode sizes segments from the whole batch (`_segment_size`): a sequence cut into other segments
    # gets other bits, so the same check fails there (it could not pass by itself)
    default_alone = one_sequence_in([], 0, x, dtype, initial, aligned=False, segment_size=32)
    default_batched = one_sequence_in([300], 1, x, dtype, initial, aligned=False, segment_size=64)
    assert not torch.equal(default_alone[1], default_batched[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [SEG, 2 * SEG, 4 * SEG])
def test_a_split_on_the_segment_grid_gives_the_bits_of_one_pass(split, dtype):
    """A chunked prefill that stops at a multiple of the segment and resumes from the pool equals one pass."""
    q, k, v = qkv(150, dtype, 3)
    initial = torch.randn(1, H, K, V, device=DEVICE)

    whole, pieces = initial.clone(), initial.clone()
    o_whole = prefill(q, k, v, [150], whole, [0], [0])
    o_first = prefill(q[:split], k[:split], v[:split], [split], pieces, [0], [0])
    o_rest = prefill(q[split:], k[split:], v[split:], [150 - split], pieces, [0], [0])
    assert torch.equal(torch.cat([o_first, o_rest]), o_whole)
    assert torch.equal(pieces, whole)


def test_aligned_mode_needs_the_callers_segment_grid():
    with pytest.raises(ValueError, match="aligned=True needs segment_size"):
        plan_prefill(ragged_offsets([10]).to(DEVICE), 10, H, V, aligned=True)
    for bad in (8, 24, 48):
        with pytest.raises(ValueError, match=f"aligned segment_size {bad} must be a power of two >= 16"):
            plan_prefill(ragged_offsets([10]).to(DEVICE), 10, H, V, segment_size=bad, aligned=True)
    plan = plan_prefill(ragged_offsets([10]).to(DEVICE), 10, H, V, segment_size=16, aligned=True)
    assert plan.aligned and plan.seg == 16  # the chunk follows the segment down (64 -> 16)


def test_without_aligned_mode_the_same_split_changes_the_bits():
    """The control of the test above: the default mode carries a step's final state in the forward's chunk
    order, not the scan's, so a split two segments in gives other bits (the equality above is not free)."""
    q, k, v = qkv(150, torch.float32, 3)
    whole = torch.randn(1, H, K, V, device=DEVICE)
    pieces = whole.clone()
    prefill(q, k, v, [150], whole, [0], [0], aligned=False)
    prefill(q[: 2 * SEG], k[: 2 * SEG], v[: 2 * SEG], [2 * SEG], pieces, [0], [0], aligned=False)
    prefill(q[2 * SEG :], k[2 * SEG :], v[2 * SEG :], [150 - 2 * SEG], pieces, [0], [0], aligned=False)
    assert not torch.equal(pieces, whole)
