"""The linear-attention backend on SGLang's own state pool and batch metadata (its Lightning test kit's mock
model runner: a real `HybridReqToTokenPool`, real `ForwardBatch`es), against the float64 recurrence.

Extend: a new request whose slot holds stale memory, a one-token continuation and a continuing chunk, in one
varlen prefill. Decode: every slot advanced in place. Triton interpreter on the CPU, small heads.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from common_kernels import tiny_config  # noqa: E402
from common_kernels.ops.linear_attn.naive import linear_attention_recurrent  # noqa: E402
from common_kernels.serving import rank_decay_rates  # noqa: E402

HEADS, HEAD_DIM = 2, 16


def _config():
    return tiny_config(num_attention_heads=HEADS, head_dim=HEAD_DIM, group_norm_size=HEADS)


@pytest.fixture(scope="module")
def kit(lightning_kit):
    return lightning_kit


def _backend(mock_backend, case):
    from ring_linear_sglang.config import RingLinearSGLangConfig

    return mock_backend(case, RingLinearSGLangConfig(**_config().to_dict()))


def _inputs(kit, case, runner, seed):
    batch = kit._make_forward_batch(case, runner, max_context_len=kit.DEFAULT_MAX_CONTEXT_LEN, device="cpu")
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(case.num_input_tokens, HEADS, HEAD_DIM, generator=g) for _ in range(2))
    v = torch.randn(case.num_input_tokens, HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)  # model dtype
    pool = runner.req_to_token_pool.mamba2_layer_cache(0).temporal
    pool.copy_(torch.randn(pool.shape, generator=g))  # stale memory in every slot, prefix states for some
    slots = runner.req_to_token_pool.req_index_to_mamba_index_mapping[batch.req_pool_indices].tolist()
    return batch, q, k, v, pool, slots


def _run_and_check(kit, mock_backend, case, seed: int, fresh: list[bool]) -> None:
    """Run `case` through the backend (extend or decode, as SGLang routes it) and hold every request's output and
    final state to the float64 recurrence from its slot's state (or zero); slots of no request stay untouched. In
    aligned mode (`RING_LINEAR_ALIGNED=1`) an extend runs token by token (no segment plan)."""
    from common_kernels.serving import aligned_mode

    runner, backend = _backend(mock_backend, case)
    batch, q, k, v, pool, slots = _inputs(kit, case, runner, seed)
    before = pool.clone()
    backend.init_forward_metadata(batch)
    if not case.forward_mode.is_decode():
        assert backend.step.aligned == aligned_mode() == (backend.step.prefill_plan is None)
    T = case.num_input_tokens
    forward = backend.forward_decode if case.forward_mode.is_decode() else backend.forward_extend
    out = forward(q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1), SimpleNamespace(layer_id=0), batch)
    assert out.shape == (T, HEADS * HEAD_DIM)
    rates, rows = rank_decay_rates(_config(), 0, 1, 0), [0, *torch.tensor(case.input_lens).cumsum(0).tolist()]
    for n, slot in enumerate(slots):
        a, b = rows[n], rows[n + 1]
        initial = None if fresh[n] else before[slot].double()
        want_o, want_state = linear_attention_recurrent(
            q[a:b].double(), k[a:b].double(), v[a:b].double(), rates.double(), HEAD_DIM**-0.5, initial
        )
        torch.testing.assert_close(out[a:b].view(b - a, HEADS, HEAD_DIM).double(), want_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool[slot].double(), want_state, atol=1e-5, rtol=1e-5)
    others = [s for s in range(pool.shape[0]) if s not in slots]
    assert torch.equal(pool[others], before[others])


@pytest.mark.parametrize("aligned", ["0"])  # aligned mode's resumes read a window buffer: test_window_buffers_*
def test_an_extend_batch_is_one_varlen_prefill_from_each_slot(
    kit, mock_backend, sglang_registered, aligned, monkeypatch
):
    monkeypatch.setenv("RING_LINEAR_ALIGNED", aligned)
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    case = kit.LightningAttentionCase(
        name="ring_mixed_extend", backend="triton", forward_mode=ForwardMode.EXTEND, num_heads=HEADS, page_size=1,
        prefix_lens=(0, 3, 5), extend_lens=(4, 1, 6),
    )  # fmt: skip
    _run_and_check(kit, mock_backend, case, seed=1, fresh=[True, False, False])


@pytest.mark.parametrize("aligned", ["0"])
def test_a_decode_batch_advances_every_slot_in_place(kit, mock_backend, sglang_registered, aligned, monkeypatch):
    monkeypatch.setenv("RING_LINEAR_ALIGNED", aligned)
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    case = kit.LightningAttentionCase(
        name="ring_decode", backend="triton", forward_mode=ForwardMode.DECODE, num_heads=HEADS, page_size=1,
        prefix_lens=(5, 2, 9),
    )  # fmt: skip
    _run_and_check(kit, mock_backend, case, seed=2, fresh=[False, False, False])


def test_aligned_decode_buffers_are_shared_and_grown_once(sglang_registered):
    """Every layer and step of an aligned decode reads its zero "fresh" flags from one buffer, grown only when a
    larger batch arrives (SGLang captures its largest graph first), not per layer."""
    from ring_linear_sglang.backend import RingLinearAttnBackend

    backend = object.__new__(RingLinearAttnBackend)
    backend.device = torch.device("cpu")
    backend._not_fresh = torch.zeros(0, dtype=torch.int8)
    backend._grow_decode_buffers(8)
    flags = backend._not_fresh
    backend._grow_decode_buffers(3)
    assert backend._not_fresh is flags  # not grown again
    assert flags.shape == (8,) and not flags.any()
    backend._grow_decode_buffers(16)
    assert backend._not_fresh.shape == (16,) and not backend._not_fresh.any()


def test_window_buffers_are_views_of_the_conv_state_and_a_wrong_one_is_refused():
    from common_kernels.ops.linear_attn.windowed import WINDOW, check_window_buffers
    from ring_linear_sglang.backend import window_buffers

    slots, heads, d_k, d_v = 5, 2, 16, 8
    conv = torch.zeros(slots, heads * (d_k + d_v), WINDOW)
    window_k, window_v = window_buffers(conv, heads, d_k, d_v)
    check_window_buffers("test", window_k, window_v, torch.zeros(slots, heads, d_k, d_v))
    window_k[3, 1].fill_(1.0)
    window_v[3, 1].fill_(2.0)
    per_slot = conv[3].flatten()
    assert per_slot.sum().item() == WINDOW * (d_k + 2 * d_v)  # both written into slot 3's own memory
    assert conv[[0, 1, 2, 4]].abs().sum() == 0
    with pytest.raises(RuntimeError, match=r"not the fp32 window buffer aligned mode declared \(\[slots, 48, 64\]\)"):
        window_buffers(conv.bfloat16(), heads, d_k, d_v)


def test_an_aligned_decode_resumes_each_slots_state_and_window(kit, mock_backend, sglang_registered, monkeypatch):
    """Aligned mode's decode on SGLang's batch: each request's token at position `seq_len - 1`, from its slot's
    state at the last grid point and the keys and values its window buffer holds since, against the float64
    recurrence over them; the buffers are the backend's (`_pools`), stood in for the kit's conv-less pool."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from common_kernels.ops.linear_attn.windowed import WINDOW

    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    case = kit.LightningAttentionCase(
        name="ring_aligned_decode", backend="triton", forward_mode=ForwardMode.DECODE, num_heads=HEADS, page_size=1,
        prefix_lens=(5, 2, 9),
    )  # fmt: skip
    runner, backend = _backend(mock_backend, case)
    batch, q, k, v, pool, slots = _inputs(kit, case, runner, seed=4)
    g = torch.Generator().manual_seed(5)
    window_k = torch.randn(pool.shape[0], HEADS, WINDOW, HEAD_DIM, generator=g)
    window_v = torch.randn(pool.shape[0], HEADS, WINDOW, HEAD_DIM, generator=g)
    monkeypatch.setattr(backend, "_pools", lambda layer_id: (pool, window_k, window_v))
    before = pool.clone()
    backend.init_forward_metadata(batch)
    out = backend.forward_decode(
        q.reshape(3, -1), k.reshape(3, -1), v.reshape(3, -1), SimpleNamespace(layer_id=0), batch
    )
    rates = rank_decay_rates(_config(), 0, 1, 0)
    for n, (slot, prefix) in enumerate(zip(slots, case.prefix_lens, strict=True)):
        ks = torch.cat([window_k[slot, :, :prefix].transpose(0, 1), k[n : n + 1]])
        vs = torch.cat([window_v[slot, :, :prefix].transpose(0, 1), v[n : n + 1].float()])
        qs = torch.cat([torch.zeros(prefix, HEADS, HEAD_DIM), q[n : n + 1]])
        want, _ = linear_attention_recurrent(
            qs.double(), ks.double(), vs.double(), rates.double(), HEAD_DIM**-0.5, before[slot].double()
        )
        torch.testing.assert_close(out[n].view(HEADS, HEAD_DIM).double(), want[-1], atol=1e-5, rtol=1e-5)
