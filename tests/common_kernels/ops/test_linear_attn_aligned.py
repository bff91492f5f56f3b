"""Aligned mode's linear attention (token by token, one fixed V-tile): right against float64 on ragged batches
(empty and one-token sequences, non-zero initial states, fresh and padded slots), and bit for bit the same for a
sequence alone or in any batch, in one pass or split anywhere, prefilled or decoded (CPU: TRITON_INTERPRET; GPU:
the same shapes, `-m gpu`)."""

import pytest
import torch

from common_kernels.ops.linear_attn.aligned import linear_attention_aligned, linear_attention_aligned_decode
from common_kernels.testing import assert_rel_rms, kernel_tolerance, pool_reference, ragged_offsets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, K, V = 2, 16, 32
SCALE = K**-0.5
RATE = torch.tensor([0.05, 0.6], device=DEVICE)


def qkv(T: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(T, H, d, generator=g).to(DEVICE, dtype) for d in (K, K, V))


def aligned(q, k, v, lengths, pool, slots, fresh) -> torch.Tensor:
    """The kernel on packed sequences of `lengths` (host lists for slots and flags); updates `pool` in place."""
    return linear_attention_aligned(
        q, k, v, RATE, SCALE, ragged_offsets(lengths).to(DEVICE, torch.int32), pool,
        torch.tensor(slots, dtype=torch.int32, device=DEVICE), torch.tensor(fresh, dtype=torch.int8, device=DEVICE),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [[37, 0, 1, 80, 16], [32, 64, 33], [1], [0, 0], [5, 1, 1, 9]], ids=str)
def test_matches_float64_on_a_stale_pool_with_fresh_and_padded_slots(lengths, dtype):
    """Every other sequence fresh (its slot NaN: never read), the last of three or more padding (slot -1: zero
    output, pool untouched), the rest continuing a random state; slots not in the batch unchanged."""
    N = len(lengths)
    q, k, v = qkv(sum(lengths), dtype, 1)
    pool = torch.randn(N + 2, H, K, V, device=DEVICE)
    slots = torch.randperm(N + 2, generator=torch.Generator().manual_seed(N))[:N].tolist()
    fresh = [int(n % 2 == 0) for n in range(N)]
    for slot, new in zip(slots, fresh, strict=True):
        if new:
            pool[slot] = float("nan")
    if N > 2:
        slots[-1] = -1
    updated = pool.clone()
    o = aligned(q, k, v, lengths, updated, slots, fresh)
    cu = ragged_offsets(lengths).to(DEVICE)
    o_ref, s_ref = pool_reference(q, k, v, RATE, SCALE, cu, pool, torch.tensor(slots), torch.tensor(fresh))
    padded = torch.zeros(sum(lengths), dtype=torch.bool, device=DEVICE)
    for n, slot in enumerate(slots):
        if slot < 0:
            padded[cu[n] : cu[n + 1]] = True
    assert o.dtype == q.dtype
    assert not o[padded].any(), "a padded sequence's rows must be zero"
    assert_rel_rms("o", o_ref[~padded], o[~padded], kernel_tolerance(q.dtype))
    for n, slot in enumerate(slots):
        if slot >= 0:
            assert_rel_rms(f"state[{n}]", s_ref[n], updated[slot], kernel_tolerance(torch.float32))
    others = [p for p in range(N + 2) if p not in slots]
    assert torch.equal(updated[others].nan_to_num(), pool[others].nan_to_num())


def one_sequence_in(others: list[int], index: int, x, dtype, initial) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence `x` (q, k, v) at position `index` among random others: its output rows and final state."""
    lengths = list(others)
    lengths.insert(index, x[0].shape[0])
    parts = [qkv(n, dtype, 10 + i) for i, n in enumerate(others)]
    parts.insert(index, x)
    q, k, v = (torch.cat([p[j] for p in parts]) for j in range(3))
    pool = torch.randn(len(lengths), H, K, V, device=DEVICE)
    pool[index] = initial
    o = aligned(q, k, v, lengths, pool, list(range(len(lengths))), [0] * len(lengths))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [[1], [37], [64, 65], [13, 14, 100, 149]], ids=str)
def test_a_sequence_split_anywhere_gives_the_bits_of_one_pass(splits, dtype):
    """Chunks resumed from the pool (a chunked prefill, a prefix-cache hit), a one-token chunk among them."""
    q, k, v = qkv(150, dtype, 3)
    initial = torch.randn(1, H, K, V, device=DEVICE)
    whole, pieces = initial.clone(), initial.clone()
    o_whole = aligned(q, k, v, [150], whole, [0], [0])
    bounds = [0, *splits, 150]
    o_pieces = [
        aligned(q[a:b], k[a:b], v[a:b], [b - a], pieces, [0], [0]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    assert torch.equal(torch.cat(o_pieces), o_whole)
    assert torch.equal(pieces, whole)


def decode_each(q, k, v, rate, scale, pool, rows, fresh_first: bool = False) -> torch.Tensor:
    """`rows` of one sequence (slot 0 of `pool`) through aligned mode's decode, one step each."""
    slot = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = []
    for n, t in enumerate(rows):
        fresh = torch.tensor([int(fresh_first and n == 0)], dtype=torch.int8, device=DEVICE)
        out.append(
            linear_attention_aligned_decode(q[t : t + 1], k[t : t + 1], v[t : t + 1], rate, scale, pool, slot, fresh)
        )
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decoding_each_token_gives_the_bits_of_the_prefill(dtype):
    """Aligned mode's decode (`linear_attention_aligned_decode`) is the prefill's arithmetic: a
    prompt prefilled equals the same tokens decoded one step at a time, the first from a zero state."""
    q, k, v = qkv(40, dtype, 4)
    prefilled, decoded = torch.zeros(2, 1, H, K, V, device=DEVICE)
    o_prefill = aligned(q, k, v, [40], prefilled, [0], [1])
    o_decode = decode_each(q, k, v, RATE, SCALE, decoded, range(40), fresh_first=True)
    assert torch.equal(o_decode, o_prefill)
    assert torch.equal(decoded, prefilled)


def test_the_varlen_form_refuses_offsets_of_the_wrong_type():
    q, k, v = qkv(4, torch.float32, 5)
    pool = torch.zeros(1, H, K, V, device=DEVICE)
    slots = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[B\+1\] int32 offsets, got torch.int64"):
        linear_attention_aligned(
            q, k, v, RATE, SCALE, ragged_offsets([4]).to(DEVICE), pool, slots, slots.to(torch.int8)
        )


@pytest.mark.gpu
@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16], ids=["v-fp32", "v-bf16"])
def test_ring_mini_shapes_one_set_of_bits_however_the_engine_runs_a_sequence(v_dtype):
    """Ring-mini's heads (16 of 128, fp32 q/k as the engines pass them) on the GPU: within float64's bound, and one
    sequence's bits the same in one pass, split at 1, 333 and 999 tokens, with its last 8 tokens decoded, and
    beside others in a batch (one compiled variant, prefill and decode)."""
    from common_kernels.ops.linear_attn.naive import linear_attention_varlen

    heads, d, lengths = 16, 128, [1000, 1, 0, 517, 64]
    g = torch.Generator().manual_seed(6)
    q, k = (torch.randn(sum(lengths), heads, d, generator=g).to(DEVICE) for _ in range(2))
    v = torch.randn(sum(lengths), heads, d, generator=g).to(DEVICE, v_dtype)
    rate = torch.linspace(0.01, 0.9, heads, device=DEVICE)
    scale = d**-0.5

    def run(rows: slice, pool, fresh: int) -> torch.Tensor:
        cu = torch.tensor([0, rows.stop - rows.start], dtype=torch.int32, device=DEVICE)
        slots, flags = torch.zeros(1, dtype=torch.int32, device=DEVICE), torch.tensor([fresh], device=DEVICE)
        return linear_attention_aligned(q[rows], k[rows], v[rows], rate, scale, cu, pool, slots, flags.to(torch.int8))

    cu = ragged_offsets(lengths).to(DEVICE, torch.int32)
    batch_pool = torch.zeros(len(lengths), heads, d, d, device=DEVICE)
    slots = torch.arange(len(lengths), dtype=torch.int32, device=DEVICE)
    fresh = torch.ones(len(lengths), dtype=torch.int8, device=DEVICE)
    batched = linear_attention_aligned(q, k, v, rate, scale, cu, batch_pool, slots, fresh)
    want, _ = linear_attention_varlen(q.double(), k.double(), v.double(), rate.double(), scale, cu.long())
    assert_rel_rms("o", want, batched, 1e-5)

    whole = torch.zeros(1, heads, d, d, device=DEVICE)
    o_whole = run(slice(0, 1000), whole, 1)
    assert torch.equal(o_whole, batched[:1000]) and torch.equal(whole[0], batch_pool[0])
    pieces = torch.zeros_like(whole)
    bounds = [0, 1, 333, 999, 1000]
    o_pieces = [run(slice(a, b), pieces, int(a == 0)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert torch.equal(torch.cat(o_pieces), o_whole) and torch.equal(pieces, whole)
    decoded = torch.zeros_like(whole)
    rows = [run(slice(0, 992), decoded, 1), decode_each(q, k, v, rate, scale, decoded, range(992, 1000))]
    assert torch.equal(torch.cat(rows), o_whole) and torch.equal(decoded, whole)
