"""The mixed-step probe's stepping (the engine needs a GPU): each timed step of the mixed kind first adds its new
requests, the decode kind adds none, and every step is timed once."""

from __future__ import annotations

from benchmarks.probe_mixed_step import timed_steps


class FakeEngine:
    def __init__(self) -> None:
        self.added, self.steps = [], 0

    def add_request(self, request_id, prompt, params) -> None:
        self.added.append((self.steps, prompt, params))

    def step(self) -> list:
        self.steps += 1
        return []


def test_mixed_steps_add_their_joins_before_stepping_and_decode_steps_add_none():
    engine, prompts = FakeEngine(), iter(range(100))
    walls = timed_steps(engine, 3, 2, prompts, "once")
    assert len(walls) == 3 and all(w >= 0 for w in walls)
    assert [(step, prompt) for step, prompt, _ in engine.added] == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    assert timed_steps(engine, 4, 0, prompts, "once") and len(engine.added) == 6 and engine.steps == 7
