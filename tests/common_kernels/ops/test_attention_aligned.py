"""Aligned mode's softmax attention kernel: equal to the float64 reference, and the same bits whether a query is
computed in a prefill over packed K/V, in a decode step over pages, alone or beside other sequences."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from common_kernels.ops.attention.aligned import causal_attention_aligned, paged_attention_aligned
from common_kernels.ops.attention.naive import causal_gqa_attention

LENGTHS = [0, 1, 17, 40, 5, 16]  # a zero-length and a one-token sequence, ragged, one exactly a page
# pages of one token (SGLang's), pages that split the kernel's 64-key tiles, and pages that hold whole tiles (vLLM's
# blocks for a hybrid model: the kernel's other compiled variant, one page id a tile)
PAGES = [1, 16, 64]


def packed(lengths, Hq=4, Hkv=2, D=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, D, generator=g).to(device, dtype) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def reference(q, k, v, cu, scale):
    bounds = cu.tolist()
    pieces = [causal_gqa_attention(*(t[a:b].double() for t in (q, k, v)), scale) for a, b in pairwise(bounds)]
    return torch.cat(pieces)


def paged_cache(k, v, cu, page=16, extra_pages=3, seed=1):
    """The sequences' keys scattered over shuffled pages, as an engine holds them, with spare pages of noise."""
    g = torch.Generator().manual_seed(seed)
    bounds = cu.tolist()
    counts = [-(-(b - a) // page) for a, b in pairwise(bounds)]
    total = sum(counts) + extra_pages
    order = torch.randperm(total, generator=g)
    kc = torch.randn(total, page, *k.shape[1:], generator=g).to(k.device, k.dtype)
    vc = torch.randn(total, page, *v.shape[1:], generator=g).to(v.device, v.dtype)
    table = torch.zeros(len(counts), max(max(counts), 1), dtype=torch.int32)
    used = 0
    for s, (a, b) in enumerate(pairwise(bounds)):
        for j in range(counts[s]):
            pid = int(order[used])
            used += 1
            table[s, j] = pid
            rows = slice(a + j * page, min(b, a + (j + 1) * page))
            n = rows.stop - rows.start
            kc[pid, :n], vc[pid, :n] = k[rows], v[rows]
    return kc, vc, table.to(k.device)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("Hq, Hkv", [(4, 2), (6, 2), (4, 4)])  # a tile of 2 heads; groups of 3 and 1: one head a tile
def test_packed_sequences_match_float64(dtype, tol, Hq, Hkv):
    q, k, v, cu = packed(LENGTHS, Hq=Hq, Hkv=Hkv, dtype=dtype)
    got = causal_attention_aligned(q, k, v, cu, 0.25, max(LENGTHS))
    assert got.dtype == dtype and got.shape == q.shape
    assert (got.double() - reference(q, k, v, cu, 0.25)).abs().max() <= tol


@pytest.mark.parametrize("page", PAGES)
def test_paged_prefill_equals_packed_bit_for_bit(page):
    q, k, v, cu = packed(LENGTHS)
    kc, vc, table = paged_cache(k, v, cu, page=page)
    seq_lens = (cu[1:] - cu[:-1]).to(torch.int32)
    paged = paged_attention_aligned(q, kc, vc, cu, seq_lens, table, 0.25, max(LENGTHS))
    assert torch.equal(paged, causal_attention_aligned(q, k, v, cu, 0.25, max(LENGTHS)))
    # the rows of a larger table picked per sequence (SGLang's req_to_token and request indices), others garbage
    big = torch.randint(0, kc.shape[0], (3 * len(LENGTHS), table.shape[1]), dtype=torch.int32)
    rows = torch.randperm(big.shape[0])[: len(LENGTHS)]
    big[rows] = table
    picked = paged_attention_aligned(q, kc, vc, cu, seq_lens, big, 0.25, max(LENGTHS), table_rows=rows)
    assert torch.equal(picked, paged)


@pytest.mark.parametrize("page", PAGES[1:])
def test_a_decode_step_and_a_mixed_step_give_each_query_the_bits_of_the_prefill(page):
    """The engine's view: sequences 0-2 decode their last token (one query each), sequence 3 prefills its last 9
    tokens after a cached prefix; each row must equal that position's row of the whole-sequence forward."""
    lengths = [1, 17, 40, 133]
    q, k, v, cu = packed(lengths)
    full = causal_attention_aligned(q, k, v, cu, 0.25, max(lengths))
    kc, vc, table = paged_cache(k, v, cu, page=page)
    ends = cu[1:].tolist()
    new = [1, 1, 1, 9]
    rows = torch.cat([torch.arange(e - n, e) for e, n in zip(ends, new, strict=True)])
    cu_q = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    step = paged_attention_aligned(
        q[rows], kc, vc, cu_q, torch.tensor(lengths, dtype=torch.int32), table, 0.25, max(new)
    )
    assert torch.equal(step, full[rows])
    decodes = paged_attention_aligned(  # the decodes alone, padded like a CUDA graph (a 0-token sequence)
        q[rows[:3]], kc, vc, torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32),
        torch.tensor([*lengths[:3], 0], dtype=torch.int32), torch.cat([table[:3], table[:1]]), 0.25, 1,
    )  # fmt: skip
    assert torch.equal(decodes, full[rows[:3]])
    ints = {"dtype": torch.int32}
    padded = paged_attention_aligned(  # a graph's padding request: one query row, no keys (seq_len 0): zeros
        q[rows[:2]], kc, vc, torch.tensor([0, 1, 2], **ints), torch.tensor([lengths[0], 0], **ints), table[:2], 0.25, 1
    )
    assert torch.equal(padded[0], full[rows[0]]) and torch.equal(padded[1], torch.zeros_like(padded[1]))


@pytest.mark.parametrize("page", PAGES[1:])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_keys_split_at_fixed_positions_give_a_decode_the_prefills_bits(dtype, tol, page, monkeypatch):
    """64-key splits (one tile each), so short sequences cross several: the prefill joins them in one program, a
    decode step in a second kernel after one program per split (or, above the programs-per-SM bound, in one
    program); all give each query the same bits, float64-close."""
    from common_kernels.ops.attention import aligned

    monkeypatch.setattr(aligned, "SPLIT", 64)
    lengths = [1, 63, 64, 65, 200, 129]
    q, k, v, cu = packed(lengths, dtype=dtype)
    full = causal_attention_aligned(q, k, v, cu, 0.25, max(lengths))
    assert (full.double() - reference(q, k, v, cu, 0.25)).abs().max() <= tol
    kc, vc, table = paged_cache(k, v, cu, page=page)
    last = cu[1:].long() - 1
    cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32)
    seq_lens = (cu[1:] - cu[:-1]).int()
    assert aligned.decode_splits(table, page, len(lengths), 1) == -(-table.shape[1] * page // 64)
    split = paged_attention_aligned(q[last], kc, vc, cu_q, seq_lens, table, 0.25, 1)
    assert torch.equal(split, full[last])
    monkeypatch.setattr(aligned, "SPLIT_BELOW_PROGRAMS_PER_SM", 0)  # every decode in one program
    assert aligned.decode_splits(table, page, len(lengths), 1) == 0
    assert torch.equal(paged_attention_aligned(q[last], kc, vc, cu_q, seq_lens, table, 0.25, 1), split)


def test_a_sequence_alone_equals_the_same_sequence_in_a_batch():
    q, k, v, cu = packed(LENGTHS)
    batch = causal_attention_aligned(q, k, v, cu, 0.25, max(LENGTHS))
    a, b = cu[3].item(), cu[4].item()  # the 40-token sequence
    alone = causal_attention_aligned(q[a:b], k[a:b], v[a:b], torch.tensor([0, b - a], dtype=torch.int32), 0.25, b - a)
    assert torch.equal(alone, batch[a:b])


def test_paged_writes_into_a_given_output_and_leaves_rows_past_the_step():
    q, k, v, cu = packed([5, 3])
    kc, vc, table = paged_cache(k, v, cu)
    out = torch.full((10, *q.shape[1:]), 7.0)
    paged_attention_aligned(q, kc, vc, cu, (cu[1:] - cu[:-1]).int(), table, 0.25, 5, out=out)
    assert torch.equal(out[:8], causal_attention_aligned(q, k, v, cu, 0.25, 5))
    assert (out[8:] == 7.0).all()


def test_gradients_are_the_reference_attentions():
    q, k, v, cu = packed([7, 12], dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    causal_attention_aligned(*leaves, cu, 0.3, 12).square().sum().backward()
    ref = [t.double().clone().requires_grad_() for t in (q, k, v)]
    reference(*ref, cu, 0.3).square().sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        assert (got.grad.double() - want.grad).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: (q, k[:, :, :16], v[:, :, :16]), "ending in \\[Hkv, d\\]"),
        (lambda q, k, v: (q[:, :3], k, v), "3 query heads over 2 KV heads"),
        (lambda q, k, v: (q, k.double(), v.double()), "must share one of fp32/bf16/fp16"),
        (lambda q, k, v: (q[..., ::2], k[..., ::2], v[..., ::2]), "unit stride"),
    ],
)
def test_bad_inputs_are_refused_naming_the_problem(change, message):
    q, k, v, cu = packed([4], D=32)
    with pytest.raises(ValueError, match=message):
        causal_attention_aligned(*change(q, k, v), cu, 0.25, 4)


@pytest.mark.gpu
@pytest.mark.parametrize(
    # fp32 follows RING_LINEAR_FP32_DOT: exact products, or TF32's 10-bit operands (about 1e-3 relative per
    # product, so a few 1e-3 on outputs of unit scale); bf16 rounds q, k, v and the probabilities to 8 bits
    "dtype, products, tol",
    [(torch.float32, "ieee", 1e-5), (torch.float32, "tf32", 1e-2), (torch.bfloat16, "tf32", 2e-2)],
)
@pytest.mark.parametrize("page", [16, 512])  # pages that split a key tile, and pages of whole tiles (vLLM's kind)
def test_ring_mini_shapes_on_the_gpu_decode_equals_prefill_bitwise(dtype, products, tol, page, monkeypatch):
    """Ring-mini's softmax layers (16 query heads over 4 KV heads of 128) over 16- or 512-token pages, on real MMAs:
    float64-close, and a decode step's rows (keys split over programs, then joined) equal to the prefill's bit for
    bit."""
    from common_kernels.ops import triton_settings

    monkeypatch.setattr(triton_settings, "FP32_DOT_PRECISION", products)
    lengths = [1, 300, 777, 64, 1025, 5000]  # the last two cross split boundaries
    q, k, v, cu = packed(lengths, Hq=16, Hkv=4, D=128, dtype=dtype, device="cuda")
    full = causal_attention_aligned(q, k, v, cu, 128**-0.5, max(lengths))
    assert (full.double() - reference(q, k, v, cu, 128**-0.5)).abs().max() <= tol
    kc, vc, table = paged_cache(k, v, cu, page=page)
    last = cu[1:].long() - 1
    cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32, device="cuda")
    step = paged_attention_aligned(q[last], kc, vc, cu_q, (cu[1:] - cu[:-1]).int(), table, 128**-0.5, 1)
    assert torch.equal(step, full[last])
    # a mixed step: decodes beside prefill chunks that continue after a cached prefix, each row the prefill's bits
    new = [1, 52, 1, 31, 9, 700]
    ends = cu[1:].tolist()
    rows = torch.cat([torch.arange(e - n, e) for e, n in zip(ends, new, strict=True)]).cuda()
    cu_step = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    mixed = paged_attention_aligned(q[rows], kc, vc, cu_step, (cu[1:] - cu[:-1]).int(), table, 128**-0.5, max(new))
    assert torch.equal(mixed, full[rows])
