"""The engine-neutral step: built from an engine's batch description, run on a slot pool, against float64.

Small shapes (the Triton interpreter on CPU): stale states in every slot, a continuing decode, a one-token
prompt scheduled as a decode, CUDA-graph padding (slot -1 and rows past the step), a new prompt and the
second chunk of a chunked prefill; v stays bf16 beside fp32 q/k, as an engine passes it.
"""

from __future__ import annotations

import pytest
import torch

from common_kernels.ops.linear_attn.naive import linear_attention_recurrent
from common_kernels.serving import build_step, warm_up_linear_attention
from common_kernels.serving import warmup as warmup_module
from common_kernels.testing import assert_rel_rms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, K = 2, 16
RATES = torch.tensor([0.05, 0.4], device=DEVICE)
SCALE = K**-0.5


def _qkv(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(rows, H, K, generator=g).to(DEVICE) for _ in range(2))
    v = torch.randn(rows, H, K, generator=g).to(DEVICE, torch.bfloat16)  # a view of a bf16 GEMM output in engines
    return q, k, v


def _reference(q, k, v, initial):
    o, final = linear_attention_recurrent(
        q.double(), k.double(), v.double(), RATES.double(), SCALE, None if initial is None else initial.double()
    )
    return o, final


def _step(lengths, seq_lens, num_decodes, decode_slots, prefill_slots, **kwargs):
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    query_start = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    num_prefills = len(lengths) - num_decodes
    slots_d = None if decode_slots is None else torch.tensor(decode_slots, dtype=torch.int32, device=DEVICE)
    slots_p = None if prefill_slots is None else torch.tensor(prefill_slots, dtype=torch.int32, device=DEVICE)
    return build_step(
        query_start, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), num_decodes, num_prefills,
        sum(lengths[:num_decodes]), sum(lengths[num_decodes:]), slots_d, slots_p, H, K, max(lengths),
        query_start_loc_host=offsets, **kwargs,
    )  # fmt: skip


def test_a_mixed_step_routes_every_request_to_its_slot_and_pads_with_zeros():
    # decodes: A continues (slot 4), B is a one-token prompt (slot 1); prefills: C new (slot 2), D's second chunk
    lengths, seq_lens = [1, 1, 5, 7], [10, 1, 5, 20]
    step = _step(lengths, seq_lens, 2, [4, 1], [2, 0])
    assert step.decode_fresh.tolist() == [0, 1] and step.prefill_fresh.tolist() == [1, 0]
    assert step.prefill_cu_seqlens.tolist() == [0, 5, 12] and step.num_tokens == 14
    pool = torch.randn(6, H, K, K, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    before = pool.clone()
    q, k, v = _qkv(14 + 3)  # three rows of engine padding after the step
    out = torch.full((17, H, K), float("nan"), device=DEVICE)
    step.run(q, k, v, out, RATES, SCALE, pool)
    rows = [0, 1, 2, 7, 14]
    for n, (slot, fresh) in enumerate([(4, False), (1, True), (2, True), (0, False)]):
        a, b = rows[n], rows[n + 1]
        want_o, want_state = _reference(q[a:b], k[a:b], v[a:b], None if fresh else before[slot])
        assert_rel_rms(f"output of request {n}", want_o, out[a:b], 1e-5)
        assert_rel_rms(f"state of request {n}", want_state, pool[slot], 1e-5)
    assert torch.equal(out[14:], torch.zeros_like(out[14:]))
    assert torch.equal(pool[[3, 5]], before[[3, 5]])  # slots of no request are untouched


def test_a_graph_padded_decode_batch_leaves_padding_rows_zero_and_the_pool_untouched():
    step = _step([1, 1], [7, 3], 2, [3, 5, -1, -1], None)
    assert step.decode_fresh.tolist() == [0, 0, 0, 0]
    pool = torch.randn(6, H, K, K, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    before = pool.clone()
    q, k, v = _qkv(4, seed=3)
    out = torch.full((4, H, K), float("nan"), device=DEVICE)
    step.run(q, k, v, out, RATES, SCALE, pool)
    for row, slot in enumerate([3, 5]):
        want_o, want_state = _reference(q[row : row + 1], k[row : row + 1], v[row : row + 1], before[slot])
        assert_rel_rms(f"decode {row}", want_o, out[row : row + 1], 1e-5)
        assert_rel_rms(f"state {slot}", want_state, pool[slot], 1e-5)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    untouched = [0, 1, 2, 4]
    assert torch.equal(pool[untouched], before[untouched])


def test_decode_flags_go_to_the_persistent_buffer_a_captured_graph_reads():
    buffer = torch.full((8,), 7, dtype=torch.int8, device=DEVICE)
    step = _step([1, 1], [1, 4], 2, [2, 6, -1], None, decode_fresh_buffer=buffer)
    assert step.decode_fresh.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert buffer[:3].tolist() == [1, 0, 0] and buffer[3:].tolist() == [7] * 5


def test_steps_with_the_same_prefill_offsets_share_one_segment_plan():
    """vLLM builds a step per KV-cache group: the plan, a function of the offsets alone, is made once."""
    first = _step([1, 5, 7], [9, 5, 20], 1, [4], [2, 0])
    again = _step([1, 5, 7], [9, 5, 20], 1, [3], [1, 5])  # another group: other slots, same offsets
    other = _step([1, 6, 6], [9, 6, 20], 1, [4], [2, 0])
    assert again.prefill_plan is first.prefill_plan
    assert other.prefill_plan is not first.prefill_plan and other.prefill_plan.nseg.tolist() == [1, 1]


def test_warm_up_runs_the_profiling_rows_as_fresh_sequences_and_the_decode_variants_once(monkeypatch):
    calls = []
    real_decode = warmup_module.linear_attention_decode
    monkeypatch.setattr(warmup_module, "_warmed", set())
    monkeypatch.setattr(
        warmup_module,
        "linear_attention_decode",
        lambda *a, **kw: calls.append((a[0].shape[0], kw["fresh"] is not None)) or real_decode(*a, **kw),
    )
    q, k, v = _qkv(10, seed=4)
    out = torch.full((10, H, K), float("nan"), device=DEVICE)
    warm_up_linear_attention(q, k, v, RATES, SCALE, torch.float32, max_num_seqs=3, out=out)
    for a, b in ((0, 3), (3, 6), (6, 10)):  # three sequences from zero states
        assert_rel_rms("warm-up prefill", _reference(q[a:b], k[a:b], v[a:b], None)[0], out[a:b], 1e-5)
    # narrow and wide V-tiles (1 and 256 / H rows), each with flags (vLLM) and without (SGLang)
    variants = [(1, True), (1, False), (128, True), (128, False)]
    assert calls == variants
    warm_up_linear_attention(q, k, v, RATES, SCALE, torch.float32, max_num_seqs=3)
    assert calls == variants  # compiled once per process and shape


@pytest.mark.parametrize("rows", [0, 1])
def test_warm_up_handles_empty_and_single_token_profiles(rows):
    q, k, v = _qkv(rows, seed=5)
    warm_up_linear_attention(q, k, v, RATES, SCALE, torch.float32, max_num_seqs=8)


def test_warm_up_compiles_the_one_launch_prefill_only_where_it_is_on(monkeypatch):
    from common_kernels.ops.linear_attn import prefill

    plans = []
    real = warmup_module.linear_attention_prefill
    monkeypatch.setattr(
        warmup_module, "linear_attention_prefill", lambda *a, **kw: plans.append(kw.get("plan")) or real(*a, **kw)
    )
    q, k, v = _qkv(10, seed=6)
    warm_up_linear_attention(q, k, v, RATES, SCALE, torch.float32, max_num_seqs=3)
    assert [p is not None and p.one_launch for p in plans] == [False]
    monkeypatch.setattr(prefill, "ONE_LAUNCH_MAX_TOKENS", 512)
    warm_up_linear_attention(q, k, v, RATES, SCALE, torch.float32, max_num_seqs=3)
    assert [p is not None and p.one_launch for p in plans] == [False, False, True]
