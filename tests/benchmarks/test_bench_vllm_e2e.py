"""The end-to-end benchmark's timing helpers (the engine runs only on a GPU; these run anywhere)."""

from types import SimpleNamespace

from benchmarks.bench_vllm_e2e import median_window_rate, prefill_repeats


def test_short_prefills_are_timed_more_often_than_long_ones():
    assert [prefill_repeats(n) for n in (1024, 4096, 16384, 65536, 131072)] == [8, 8, 4, 2, 2]


def test_decode_rate_is_the_median_window_so_one_stalled_window_does_not_count():
    now = [0.0]
    step_seconds = iter([0.01] * 4 + [0.05] * 4 + [0.01] * 4)  # the second window stalls

    def clock() -> float:
        return now[0]

    def step() -> list:
        now[0] += next(step_seconds)
        finished = SimpleNamespace(request_id="a", outputs=[])  # outputs without tokens count nothing
        return [SimpleNamespace(request_id=r, outputs=[SimpleNamespace(token_ids=[7])]) for r in "bc"] + [finished]

    # two tokens a step: 200 tokens/s in the normal windows, 40 in the stalled one
    assert abs(median_window_rate(step, steps=4, windows=3, clock=clock) - 200.0) < 1e-9
