"""The window-form linear attention (`ops.linear_attn.windowed`): against float64 on ragged batches that resume
mid-window from a state and a buffer, with empty, one-token and padded sequences; and a sequence's bits the same in
one call, split at any token, decoded token by token, and beside other sequences."""

import pytest
import torch

from common_kernels.ops.linear_attn.naive import linear_attention_recurrent
from common_kernels.ops.linear_attn.windowed import (
    WINDOW,
    linear_attention_windowed,
    linear_attention_windowed_decode,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, K, V = 2, 16, 32
RATE = torch.tensor([0.05, 0.4])
SCALE = 0.25


def sequence(length, seed, v_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(length, H, K, generator=g), torch.randn(length, H, K, generator=g) * 0.3
    return q, k, torch.randn(length, H, V, generator=g).to(v_dtype)


def pools(slots, width=V):
    return (
        torch.zeros(slots, H, K, width, device=DEVICE),
        torch.zeros(slots, H, WINDOW, K, device=DEVICE),
        torch.zeros(slots, H, WINDOW, width, device=DEVICE),
    )


def step(parts, state):
    """One call: `parts` is [(q, k, v, start, slot, fresh)] per sequence, `state` the (pool, window_k, window_v)."""
    q, k, v = (torch.cat([p[i] for p in parts]).to(DEVICE) for i in range(3))
    cu = torch.tensor([0] + [len(p[0]) for p in parts], dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    starts, slots = (torch.tensor([p[i] for p in parts], device=DEVICE) for i in (3, 4))
    fresh = torch.tensor([p[5] for p in parts], dtype=torch.int8, device=DEVICE)
    out = linear_attention_windowed(q, k, v, RATE, SCALE, cu, starts, *state, slots, fresh)
    return out.cpu().split([len(p[0]) for p in parts])


def run_split(q, k, v, cuts, state, slot=0):
    """The sequence through slot `slot`, one call per piece between `cuts`."""
    outs = [
        step([(q[a:b], k[a:b], v[a:b], a, slot, int(a == 0))], state)[0] for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    return torch.cat(outs)


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_a_ragged_batch_resuming_mid_window_matches_float64(v_dtype):
    """Five sequences in one call after a first call left them mid-window (or fresh): 0, 1, 5, 64 and 130 new tokens
    from positions 0, 37, 64, 3 and 100, plus a padding slot; outputs and the state at the last grid point against
    the float64 recurrence over the whole sequence."""
    starts, news = [0, 37, 64, 3, 100], [0, 1, 5, 64, 130]
    seqs = [sequence(s + n, seed, v_dtype) for seed, (s, n) in enumerate(zip(starts, news, strict=True))]
    state = pools(6)
    first = [(q[:s], k[:s], v[:s], 0, slot, 1) for slot, ((q, k, v), s) in enumerate(zip(seqs, starts, strict=True))]
    step(first, state)
    second = [
        (q[s:], k[s:], v[s:], s, slot, int(s == 0))
        for slot, ((q, k, v), s) in enumerate(zip(seqs, starts, strict=True))
    ]
    padding = sequence(7, 99, v_dtype)
    outs = step([*second, (*padding, 0, -1, 1)], state)
    assert torch.equal(outs[-1], torch.zeros_like(outs[-1]))
    for slot, ((q, k, v), s, n) in enumerate(zip(seqs, starts, news, strict=True)):
        want, _ = linear_attention_recurrent(q.double(), k.double(), v.double(), RATE.double(), SCALE)
        assert outs[slot].shape == (n, H, V)
        torch.testing.assert_close(outs[slot].double(), want[s:], rtol=1e-5, atol=1e-5)
        grid = (s + n) // WINDOW * WINDOW
        _, want_state = linear_attention_recurrent(
            q[:grid].double(), k[:grid].double(), v[:grid].double(), RATE.double(), SCALE
        )
        torch.testing.assert_close(state[0][slot].cpu().double(), want_state, rtol=1e-5, atol=1e-5)
    assert torch.equal(state[0][5].cpu(), torch.zeros(H, K, V))  # the padding slot untouched


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_a_sequences_bits_do_not_depend_on_how_its_tokens_were_split(v_dtype):
    q, k, v = sequence(150, 7, v_dtype)
    whole = run_split(q, k, v, [0, 150], pools(1))
    for cuts in ([0, 37, 64, 65, 100, 128, 150], [0, 1, 2, 63, 64, 150], list(range(151))):
        state = pools(1)
        assert torch.equal(run_split(q, k, v, cuts, state), whole), cuts
    one_pass = pools(1)
    run_split(q, k, v, [0, 150], one_pass)
    live = 150 % WINDOW  # the buffer rows a next call reads; rows past them may hold an earlier window's tokens
    assert torch.equal(state[0], one_pass[0])
    assert all(torch.equal(a[:, :, :live], b[:, :, :live]) for a, b in zip(state[1:], one_pass[1:], strict=True))


def test_several_v_tiles_continuing_past_their_window_read_the_buffer_before_it_is_rewritten():
    """A prefill that resumes mid-window and runs into the next window keeps the next window's keys in the same
    buffer rows the first window's programs read: with two V-tiles (the interpreter runs them one after the other,
    as a busy GPU may) the first must not overwrite keys the second has yet to read."""
    g = torch.Generator().manual_seed(21)
    wide = 64  # two V-tiles of WINDOWED_BLOCK_V = 32
    q, k = torch.randn(150, H, K, generator=g), torch.randn(150, H, K, generator=g) * 0.3
    v = torch.randn(150, H, wide, generator=g)
    whole = run_split(q, k, v, [0, 150], pools(1, wide))
    want, _ = linear_attention_recurrent(q.double(), k.double(), v.double(), RATE.double(), SCALE)
    torch.testing.assert_close(whole.double(), want, rtol=1e-5, atol=1e-5)
    # 21 -> 73 rewrites rows 0-8 of the buffer it read
    assert torch.equal(run_split(q, k, v, [0, 21, 73, 150], pools(1, wide)), whole)


def test_a_sequences_bits_do_not_depend_on_the_batch():
    q, k, v = sequence(90, 8)
    others = [sequence(n, 9 + n) for n in (3, 200, 64)]
    alone = step([(q, k, v, 0, 0, 1)], pools(4))[0]
    together = step(
        [(*others[0], 0, 1, 1), (q, k, v, 0, 0, 1), *[(*s, 0, i + 2, 1) for i, s in enumerate(others[1:])]], pools(4)
    )
    assert torch.equal(together[1], alone)


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
# one V-tile; two, a program each or one; four V-tiles asked three a program (two each: 3 does not divide 4)
@pytest.mark.parametrize("width, tiles", [(V, 1), (64, 1), (64, 2), (128, 3)])
def test_the_one_token_kernel_gives_the_window_forms_bits(v_dtype, width, tiles, monkeypatch):
    """A decode step through the one-token kernel and through the window form (one-row sequences), from the same
    stale state and buffers: a fresh one-token prompt, tokens mid-window, a window's last token (folded) and first,
    and a padding row; the same outputs, states and buffers, however many V-tiles a decode program takes."""
    from common_kernels.ops.linear_attn import windowed

    monkeypatch.setattr(windowed, "WINDOWED_DECODE_TILES", tiles)
    starts = [0, 5, 31, 63, 64, 127, 200, 0]
    slots = [0, 1, 2, 3, 4, 5, 6, -1]
    fresh = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int8, device=DEVICE)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(len(starts), H, K, generator=g), torch.randn(len(starts), H, K, generator=g) * 0.3
    q, k, v = q.to(DEVICE), k.to(DEVICE), torch.randn(len(starts), H, width, generator=g).to(DEVICE, v_dtype)
    g = torch.Generator().manual_seed(4)
    shapes = ((K, width), (WINDOW, K), (WINDOW, width))
    stale = [torch.randn(8, H, *shape, generator=g).to(DEVICE) for shape in shapes]
    by_window, by_token = [t.clone() for t in stale], [t.clone() for t in stale]
    starts_t, slots_t = (torch.tensor(x, device=DEVICE) for x in (starts, slots))
    cu = torch.arange(len(starts) + 1, dtype=torch.int32, device=DEVICE)
    want = linear_attention_windowed(q, k, v, RATE, SCALE, cu, starts_t, *by_window, slots_t, fresh)
    got = linear_attention_windowed_decode(q, k, v, RATE, SCALE, starts_t, *by_token, slots_t, fresh)
    assert torch.equal(got, want) and torch.equal(got[-1], torch.zeros_like(got[-1]))
    for mine, theirs in zip(by_token, by_window, strict=True):
        assert torch.equal(mine, theirs)
    assert not torch.equal(by_token[0][3], stale[0][3])  # position 63 folded its window into the state


def test_the_window_form_refuses_misshapen_buffers_and_offsets():
    q, k, v = (t.to(DEVICE) for t in sequence(4, 1))
    pool, wk, wv = pools(2)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    ok = (torch.zeros(1, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE))
    fresh = torch.ones(1, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match=r"window_k must be float32 \[2, 2, 64, 16\]"):
        linear_attention_windowed(q, k, v, RATE, SCALE, cu, ok[0], pool, wk[:, :, :32], wv, ok[1], fresh)
    with pytest.raises(ValueError, match="window_v must be float32"):
        linear_attention_windowed(q, k, v, RATE, SCALE, cu, ok[0], pool, wk, wv.bfloat16(), ok[1], fresh)
    with pytest.raises(ValueError, match=r"starts must be \[1\]"):
        linear_attention_windowed(q, k, v, RATE, SCALE, cu, ok[0][:0], pool, wk, wv, ok[1], fresh)
    with pytest.raises(ValueError, match="state_pool must be float32"):
        linear_attention_windowed(q, k, v, RATE, SCALE, cu, ok[0], pool.bfloat16(), wk, wv, ok[1], fresh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("products, tol", [("tf32x3", 1e-5), ("tf32", 2e-2)])  # fp32-accurate; TF32's 10-bit operands
def test_the_window_form_on_a_gpu_at_ring_mini_heads(products, tol, monkeypatch):
    """16 heads of 128, fp32 q/k and bf16 v, 1,000 tokens: float64-close, and the same bits in one pass, split at 1,
    333 and 999 tokens with the last 8 decoded one a step, and with the last 100 through the one-token kernel."""
    from common_kernels.ops import triton_settings

    monkeypatch.setattr(triton_settings, "FP32_DOT_PRECISION", products)
    Hm, d, L = 16, 128, 1000
    g = torch.Generator().manual_seed(13)
    q, k = (torch.randn(L, Hm, d, generator=g) * 0.1).cuda(), (torch.randn(L, Hm, d, generator=g) * 0.1).cuda()
    v = torch.randn(L, Hm, d, generator=g).bfloat16().cuda()
    rate = torch.linspace(0.01, 0.8, Hm).cuda()

    def through(cuts, tokens=0):
        """`cuts` through the window form, then `tokens` more one a step through the one-token kernel."""
        state = (
            torch.zeros(1, Hm, d, d, device="cuda"),
            torch.zeros(1, Hm, WINDOW, d, device="cuda"),
            torch.zeros(1, Hm, WINDOW, d, device="cuda"),
        )
        outs = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            cu = torch.tensor([0, b - a], dtype=torch.int32, device="cuda")
            start, slot = (torch.tensor([x], device="cuda") for x in (a, 0))
            fresh = torch.tensor([int(a == 0)], dtype=torch.int8, device="cuda")
            outs.append(linear_attention_windowed(q[a:b], k[a:b], v[a:b], rate, 0.088, cu, start, *state, slot, fresh))
        slot, fresh = torch.zeros(1, dtype=torch.long, device="cuda"), torch.zeros(1, dtype=torch.int8, device="cuda")
        for t in range(cuts[-1], cuts[-1] + tokens):
            start = torch.tensor([t], device="cuda")
            one = slice(t, t + 1)
            outs.append(
                linear_attention_windowed_decode(q[one], k[one], v[one], rate, 0.088, start, *state, slot, fresh)
            )
        return torch.cat(outs)

    whole = through([0, L])
    want, _ = linear_attention_recurrent(q.double(), k.double(), v.double(), rate.double(), 0.088)
    torch.testing.assert_close(whole.double(), want, rtol=tol, atol=tol)
    assert torch.equal(through([0, 1, 333, 992, *range(993, L + 1)]), whole)
    assert torch.equal(through([0, 1, 333, 900], L - 900), whole)  # 100 one-token steps, crossing 960
