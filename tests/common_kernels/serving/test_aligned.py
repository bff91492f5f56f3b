"""Aligned mode's linear attention: requests served over engine steps (prefill chunks stopped anywhere, a prompt's
last token run as a decode, beside other requests' decodes and CUDA-graph padding) give, bit for bit, what
`linear_attention_as_served` gives for them, alone or together; and the environment switch is parsed strictly.

Small shapes on the Triton interpreter (CPU); the same code runs on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from common_kernels.ops.linear_attn.naive import linear_attention_recurrent
from common_kernels.ops.linear_attn.windowed import WINDOW, linear_attention_as_served
from common_kernels.serving import ALIGNED_MODE_SWITCH, aligned_mode, build_step
from common_kernels.testing import assert_rel_rms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, K = 2, 16
RATES = torch.tensor([0.05, 0.4], device=DEVICE)
SCALE = K**-0.5

# request -> (prompt length, generated tokens fed back, pool slot)
REQUESTS = {"A": (150, 4, 3), "B": (1, 3, 0), "C": (70, 2, 5)}
# each step: decodes first (request, position), then prefill chunks (request, start, end). Chunks stop anywhere (37,
# 120: off any grid), C's last prompt token (69) runs as a one-token decode as vLLM schedules it, and B's one-token
# prompt is a decode from a zero state.
STEPS = [
    ([], [("A", 0, 37), ("C", 0, 69)]),
    ([("C", 69), ("B", 0)], [("A", 37, 120)]),
    ([("C", 70), ("B", 1)], [("A", 120, 150)]),
    ([("A", 150), ("B", 2), ("C", 71)], []),
    ([("A", 151), ("B", 3)], []),
    ([("A", 152)], []),
    ([("A", 153)], []),
]


def request_qkv(name: str):
    prompt, generated, _ = REQUESTS[name]
    g = torch.Generator().manual_seed(ord(name))
    n = prompt + generated
    q, k = (torch.randn(n, H, K, generator=g).to(DEVICE) for _ in range(2))
    return q, k, torch.randn(n, H, K, generator=g).to(DEVICE, torch.bfloat16)


def serve(aligned: bool, graph_padding: int = 2) -> dict[str, torch.Tensor]:
    """Every request through `STEPS` on one stale pool; each request's output rows."""
    qkv = {name: request_qkv(name) for name in REQUESTS}
    outputs = {name: torch.full((sum(REQUESTS[name][:2]), H, K), float("nan"), device=DEVICE) for name in REQUESTS}
    stale = torch.Generator().manual_seed(9)  # a finished request's state and window: a fresh one must not see them
    pool = torch.randn(6, H, K, K, generator=stale).to(DEVICE)
    window_k, window_v = (torch.randn(6, H, WINDOW, K, generator=stale).to(DEVICE) for _ in range(2))
    for decodes, prefills in STEPS:
        pieces = [(name, pos, pos + 1) for name, pos in decodes] + list(prefills)
        lengths = [b - a for _, a, b in pieces]
        offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        pad = graph_padding if decodes and not prefills else 0
        slots_d = [REQUESTS[name][2] for name, _ in decodes] + [-1] * pad
        step = build_step(
            torch.tensor(offsets, dtype=torch.int32, device=DEVICE),
            torch.tensor([b for _, _, b in pieces], dtype=torch.int32, device=DEVICE),
            len(decodes), len(prefills), len(decodes) + pad, sum(lengths[len(decodes) :]),
            torch.tensor(slots_d, dtype=torch.int32, device=DEVICE) if decodes else None,
            torch.tensor([REQUESTS[n][2] for n, _, _ in prefills], dtype=torch.int32, device=DEVICE)
            if prefills else None,
            H, K, max(lengths), query_start_loc_host=offsets, aligned=aligned,
        )  # fmt: skip
        rows = [(name, a, b) for name, a, b in pieces[: len(decodes)]] + [("", 0, 1)] * pad + pieces[len(decodes) :]
        q, k, v = (torch.cat([qkv[n][i][a:b] if n else qkv["A"][i][:1] * 0 for n, a, b in rows]) for i in range(3))
        out = torch.full((q.shape[0], H, K), float("nan"), device=DEVICE)
        step.run(q, k, v, out, RATES, SCALE, pool, window_k, window_v)
        row = 0
        for name, a, b in rows:
            if name:
                outputs[name][a:b] = out[row : row + b - a]
            row += b - a
    return outputs


def as_served(names: list[str]) -> dict[str, torch.Tensor]:
    """`linear_attention_as_served` over the named requests packed together."""
    parts = [request_qkv(name) for name in names]
    q, k, v = (torch.cat([p[i] for p in parts]) for i in range(3))
    lengths = [sum(REQUESTS[name][:2]) for name in names]
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    o = linear_attention_as_served(q, k, v, RATES, SCALE, offsets)
    return {name: o[offsets[i] : offsets[i + 1]] for i, name in enumerate(names)}


def test_served_requests_equal_the_trainers_call_bit_for_bit_alone_and_together():
    served = serve(aligned=True)
    together = as_served(["A", "B", "C"])
    for name in REQUESTS:
        alone = as_served([name])[name]
        assert torch.equal(served[name], alone), f"request {name}: the engine's steps differ from the trainer's call"
        assert torch.equal(together[name], alone), f"request {name}: the trainer's call depends on the batch"
    q, k, v = request_qkv("A")  # and it is the right function
    want, _ = linear_attention_recurrent(q.double(), k.double(), v.double(), RATES.double(), SCALE, None)
    assert_rel_rms("request A", want, served["A"], 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_served_requests_equal_the_trainers_call_at_ring_mini_heads_on_a_gpu(monkeypatch):
    """The same steps with Ring-mini's 16 heads of 128, on real MMAs."""
    monkeypatch.setitem(globals(), "H", 16)
    monkeypatch.setitem(globals(), "K", 128)
    monkeypatch.setitem(globals(), "RATES", torch.linspace(0.01, 0.8, 16, device=DEVICE))
    monkeypatch.setitem(globals(), "SCALE", 128**-0.5)
    served = serve(aligned=True)
    for name in REQUESTS:
        assert torch.equal(served[name], as_served([name])[name]), f"request {name}: the engine's steps differ"


def test_without_aligned_mode_the_same_steps_give_other_bits():
    """The control of the test above: the default prefill (segments and chunk products) rounds differently from
    the window form, so the equality above is not free."""
    served, alone = serve(aligned=False), as_served(list(REQUESTS))
    assert not all(torch.equal(served[name], alone[name]) for name in REQUESTS)


@pytest.mark.parametrize("aligned", [True, False])
def test_the_switch_picks_the_aligned_kernel_for_prefill_and_decode(monkeypatch, aligned):
    """What aligned mode changes in a step, checked directly: its prefill and its decode are the window form's,
    with no segment plan."""
    from common_kernels.serving import step as step_module

    calls = []
    names = ("linear_attention_windowed", "linear_attention_prefill", "linear_attention_decode")
    for name in names:
        real = getattr(step_module, name)
        monkeypatch.setattr(
            step_module, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)
        )
    serve(aligned)
    step = build_step(
        torch.tensor([0, 1, 151], dtype=torch.int32, device=DEVICE), torch.tensor([9, 150], device=DEVICE), 1, 1,
        1, 150, torch.tensor([0], device=DEVICE), torch.tensor([1], device=DEVICE), H, K, 150, aligned=aligned,
    )  # fmt: skip
    assert (step.prefill_plan is None) is aligned
    assert set(calls) == set(names[:1] if aligned else names[1:])


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_the_trainers_call_is_differentiable_with_the_standard_gradient(v_dtype):
    q, k, v = request_qkv("C")
    q, k, v = q.float().requires_grad_(), k.float().requires_grad_(), v.to(v_dtype).requires_grad_()
    o = linear_attention_as_served(q, k, v, RATES, SCALE, [0, 72])
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = linear_attention_recurrent(*leaves, RATES.double(), SCALE, None)
    assert grads[2].dtype == v_dtype
    for name, want, got in zip("qkv", torch.autograd.grad(ref, leaves, do.double()), grads, strict=True):
        assert_rel_rms(f"d{name}", want, got, 1e-5 if v_dtype == torch.float32 or name != "v" else 1e-2)


@pytest.mark.parametrize("offsets", [[0, 40], [1, 72], [0, 50, 40, 72], []], ids=str)
def test_offsets_that_do_not_cover_the_rows_are_refused(offsets):
    q, k, v = request_qkv("C")
    with pytest.raises(ValueError, match="offsets must rise from 0 to 72"):
        linear_attention_as_served(q, k, v, RATES, SCALE, offsets)


@pytest.mark.parametrize("value,want", [("1", True), ("on", True), ("0", False), ("", False), ("off", False)])
def test_the_aligned_switch_reads_on_and_off(monkeypatch, value, want):
    monkeypatch.setenv(ALIGNED_MODE_SWITCH, value)
    assert aligned_mode() is want


def test_the_aligned_switch_refuses_anything_else_naming_itself(monkeypatch):
    monkeypatch.setenv(ALIGNED_MODE_SWITCH, "maybe")
    with pytest.raises(ValueError, match="RING_LINEAR_ALIGNED='maybe' is not understood: set it to 1 or 0"):
        aligned_mode()


def test_warm_up_in_aligned_mode_runs_the_window_form(monkeypatch):
    """A served request must not wait for a compile: warm-up runs the kernels the mode serves with (aligned: the
    window form's prefill and one-token decode, with the engine's start and flag types), and the default decode's
    variants only in default mode (aligned mode never runs them)."""
    from common_kernels.serving import warm_up_linear_attention
    from common_kernels.serving import warmup as warmup_module

    monkeypatch.setattr(warmup_module, "_warmed", set())
    decodes = []
    real_decode = warmup_module.linear_attention_decode
    monkeypatch.setattr(
        warmup_module, "linear_attention_decode", lambda *a, **kw: decodes.append(1) or real_decode(*a, **kw)
    )
    calls = []
    for name in ("linear_attention_windowed", "linear_attention_windowed_decode", "linear_attention_prefill"):
        real = getattr(warmup_module, name)
        monkeypatch.setattr(
            warmup_module, name, lambda *a, _real=real, _name=name, **kw: calls.append((_name, a)) or _real(*a, **kw)
        )
    q, k, v = request_qkv("C")
    warm_up_linear_attention(q, k, v, RATES, SCALE, torch.float32, max_num_seqs=3, aligned=True)
    assert decodes == []
    warm_up_linear_attention(q, k, v, RATES, SCALE, torch.float32, max_num_seqs=3, aligned=False)
    assert len(decodes) == 4  # narrow and wide tiles, with and without flags
    names = [name for name, _ in calls]
    assert names == ["linear_attention_windowed", "linear_attention_windowed_decode", "linear_attention_prefill"]
    assert calls[0][1][6].dtype == torch.int64 and calls[0][1][11].dtype == torch.int8  # starts and fresh flags
    assert calls[1][1][5].dtype == torch.int64 and calls[1][1][10].dtype == torch.int8 and calls[1][1][0].shape[0] == 1
