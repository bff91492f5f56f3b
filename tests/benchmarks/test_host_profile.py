"""The served host profile's pieces that run anywhere: finding the engine core by its process title, reading
py-spy's raw stacks into per-thread shares, and stopping a recording so it writes (a stand-in py-spy)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from benchmarks import host_profile

LOOP = "MainThread;run_engine_core (core.py:10);run_busy_loop (core.py:20)"
RAW = f"""\
thread (101): {LOOP};step (core.py:30);schedule (sched.py:5) 30
thread (101): {LOOP};step (core.py:31);tolist (backend.py:77) 60
thread (101): {LOOP};step (core.py:30);schedule (sched.py:9) 10
thread (102): output;run (threading.py:982);process_outputs (core.py:50) 5
not a stack line
"""


def test_raw_stacks_add_up_per_thread_and_function():
    threads = host_profile.parse_raw(RAW)
    main = threads["MainThread"]
    assert main.samples == 100 and threads["output"].samples == 5
    # a function's lines add up (schedule at lines 5 and 9), and a frame counts once per stack
    assert main.inclusive["schedule (sched.py)"] == 40
    assert main.inclusive["step (core.py)"] == 100
    assert main.leaf["tolist (backend.py)"] == 60 and main.leaf["step (core.py)"] == 0


def test_the_description_leaves_out_the_trunk_and_quiet_threads():
    lines = host_profile.describe(host_profile.parse_raw(RAW), seconds=1.0, rate_hz=100)
    assert lines[0] == "thread MainThread: busy 100% of 1.0 s (100 samples)"
    assert any("60.0% in   tolist (backend.py)" in line for line in lines)
    assert any("40.0% in   schedule (sched.py)" in line for line in lines)
    assert any("60.0% self tolist (backend.py)" in line for line in lines)
    assert not any(" in   run_busy_loop" in line for line in lines)  # on every stack: the trunk
    assert "thread output: busy 5% of 1.0 s (5 samples)" in lines
    quiet = host_profile.describe(host_profile.parse_raw(RAW), seconds=4.0, rate_hz=100)  # output: 1.25%, left out
    assert [line for line in quiet if line.startswith("thread")] == [
        "thread MainThread: busy 25% of 4.0 s (100 samples)"
    ]


def test_the_engine_core_is_found_by_its_process_title(tmp_path):
    for pid, command in [(7, b"VLLM::EngineCore\0"), (8, b"python3\0-m\0vllm.entrypoints.cli.main\0serve\0"),
                         (9, b"sglang::scheduler_TP0\0")]:  # fmt: skip
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(command)
    (tmp_path / "self").mkdir()
    (tmp_path / "10").mkdir()  # a process that went away: no cmdline
    assert host_profile.find_processes("EngineCore", proc=tmp_path) == [7]
    assert host_profile.find_processes(host_profile.ENGINE_CORE_TITLES["sglang"], proc=tmp_path) == [9]
    assert host_profile.find_processes("EngineCore") == []  # this machine runs no engine


@pytest.mark.parametrize("ignored", [False, True], ids=["sigint_default", "sigint_ignored"])
def test_a_recording_is_stopped_with_sigint_so_it_writes(tmp_path, ignored):
    """Also from a process that ignores SIGINT, as one started in the background (`cmd &`, nohup) does: py-spy
    would inherit that and never stop (CI run from a background shell hit it)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.getsignal(signal.SIGINT))
    try:
        record_and_stop(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def record_and_stop(tmp_path):
    stand_in = tmp_path / "py-spy"  # writes its output only when interrupted, as py-spy record does
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        "out = sys.argv[sys.argv.index('--output') + 1]\n"
        "try:\n"
        "    open(out + '.ready', 'w').close()\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    open(out, 'w').write('thread (1): MainThread;f (a.py:1) 1000\\n')\n"
    )
    stand_in.chmod(0o755)
    output = tmp_path / "stacks.txt"
    started = time.monotonic()
    with host_profile.PySpyRecording(str(stand_in), os.getpid(), output) as recording:
        ready = Path(f"{output}.ready")  # the stand-in handles SIGINT from here on (its start is slow on a busy CPU)
        while not ready.exists() and time.monotonic() - started < 20:
            time.sleep(0.05)
        time.sleep(0.5)
    assert time.monotonic() - started < 30
    assert recording.process.returncode == 0 and 0.5 <= recording.seconds < 30
    assert recording.describe()[0].endswith(f"of {recording.seconds:.1f} s (1000 samples)")
    assert host_profile.parse_raw(output.read_text())["MainThread"].samples == 1000
    assert Path(recording.log).exists()


def test_a_recording_that_wrote_nothing_says_so(tmp_path):
    stand_in = tmp_path / "py-spy"
    stand_in.write_text(f"#!{sys.executable}\nprint('Error: Permission denied')\nraise SystemExit(1)\n")
    stand_in.chmod(0o755)
    with host_profile.PySpyRecording(str(stand_in), os.getpid(), tmp_path / "stacks.txt") as recording:
        recording.process.wait(timeout=30)
    (line,) = recording.describe()
    assert line.startswith("py-spy wrote nothing (exit 1): Error: Permission denied;")


def test_the_serving_benchmark_records_only_when_asked(tmp_path, capsys):
    from benchmarks import bench_serve

    args = bench_serve.parser().parse_args(["run", "--model", "ring-linear", "--out", str(tmp_path)])
    with bench_serve.host_recordings(args, tmp_path, "x.json") as recordings:
        assert recordings == []
    args = bench_serve.parser().parse_args(["run", "--model", "ring-linear", "--py-spy", "/no/py-spy"])
    with bench_serve.host_recordings(args, tmp_path, "x.json") as recordings:  # no engine runs here
        assert recordings == []
    assert "no EngineCore process found: not recorded" in capsys.readouterr().out


def test_a_py_spy_path_that_is_not_a_program_is_refused_before_a_server_starts(tmp_path):
    from benchmarks import bench_serve

    argv = ["run", "--model", "ring-linear", "--out", str(tmp_path / "out"), "--py-spy", str(tmp_path / "missing")]
    with pytest.raises(SystemExit, match="--py-spy .*missing is not an executable file"):
        bench_serve.run(bench_serve.parser().parse_args(argv))
    assert not (tmp_path / "out").exists()  # refused before anything was written or started
