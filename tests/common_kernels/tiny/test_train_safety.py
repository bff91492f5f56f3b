"""Training never overwrites a folder by surprise, saves on a schedule and on Ctrl-C, and resumes exactly."""

from __future__ import annotations

import pytest
import torch

from common_kernels import InvalidInputError, RingLinearForCausalLM
from common_kernels.tiny import train as train_module
from common_kernels.tiny.train import TRAINING_STATE, TrainingInterrupted, make_tiny_checkpoint, train


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("init")
    make_tiny_checkpoint(path)
    return path


def _weights(path) -> list[torch.Tensor]:
    return list(RingLinearForCausalLM.from_pretrained(path).state_dict().values())


def _run(init_dir, out, steps, **kwargs):
    return train(init_dir, out, steps=steps, batch_size=4, progress=False, **kwargs)


def test_an_output_folder_with_files_is_refused_unless_overwrite(init_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="already holds files; pass --overwrite"):
        _run(init_dir, out, 1)
    assert (out / "keep.txt").read_text() == "mine"
    _run(init_dir, out, 1, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"  # a save replaces the checkpoint files only


def test_saving_on_a_schedule_does_not_change_the_training(init_dir, tmp_path):
    _run(init_dir, tmp_path / "straight", 6)
    _run(init_dir, tmp_path / "saved", 6, save_every=2)
    assert torch.load(tmp_path / "saved" / TRAINING_STATE, weights_only=True)["step"] == 6
    for a, b in zip(_weights(tmp_path / "straight"), _weights(tmp_path / "saved"), strict=True):
        assert torch.equal(a, b)


def test_ctrl_c_saves_the_step_reached_and_a_resumed_run_equals_an_uninterrupted_one(init_dir, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = []

    def step_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(TrainingInterrupted, match="step 2 of 5 saved to"):
        _run(init_dir, out, 5)
    monkeypatch.undo()
    assert torch.load(out / TRAINING_STATE, weights_only=True)["step"] == 2
    assert _run(init_dir, out, 5, resume=True).steps == 5
    _run(init_dir, tmp_path / "straight", 5)
    for a, b in zip(_weights(tmp_path / "straight"), _weights(out), strict=True):
        assert torch.equal(a, b)


def test_the_time_cap_is_reported(init_dir, tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 30))  # every call to time.time() moves 30 s
    monkeypatch.setattr(train_module.time, "time", lambda: next(clock))
    result = _run(init_dir, tmp_path / "out", 50, minutes=1.0)
    assert result.stopped_by_time and 0 < result.steps < 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"minutes": 0}, "minutes must be a finite number > 0, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ],
)
def test_bad_training_arguments_are_named(init_dir, tmp_path, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        train(init_dir, tmp_path / "out", progress=False, **kwargs)


def test_resume_without_a_saved_state_is_named(init_dir, tmp_path):
    with pytest.raises(InvalidInputError, match=f"no {TRAINING_STATE} to resume from"):
        _run(init_dir, tmp_path / "nothing", 2, resume=True)


def test_a_diverging_run_stops_and_saves_nothing(init_dir, tmp_path):
    from common_kernels.tiny.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="training diverged at step .*lower --lr.*nothing was saved"):
        _run(init_dir, tmp_path / "out", 5, lr=1e30)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_other_arguments_and_a_damaged_state(init_dir, tmp_path):
    from common_kernels import CheckpointError

    out = tmp_path / "out"
    _run(init_dir, out, 2)
    with pytest.raises(InvalidInputError, match=r"differing: --lr 0.5 \(saved: 0.003\)"):
        _run(init_dir, out, 2, resume=True, lr=0.5)
    (out / TRAINING_STATE).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=f"{TRAINING_STATE}: unreadable trainer state"):
        _run(init_dir, out, 2, resume=True)
