"""Where a served engine's host time goes: py-spy samples of the engine's scheduler process during one pass.

A served Ring-mini decode step streams its tokens further apart than the twin's although its GPU work is smaller
(RESULTS.md run AD): time that a GPU profile cannot see. `bench_serve run
--py-spy PATH` records the engine core (vLLM's `VLLM::EngineCore`, SGLang's scheduler) with py-spy for each pass,
keeps the raw stacks beside the results and prints, per thread, how busy it was and the functions it was busy in.
A process that waits on the GPU spins inside the Python call that waited (a `.tolist()`, an event sync), so a host
synchronisation shows as a frame, not as idle time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# the process titles each engine gives the process that schedules and launches the steps
ENGINE_CORE_TITLES = {"vllm": "EngineCore", "sglang": "sglang::scheduler"}


def find_processes(title: str, proc: Path = Path("/proc")) -> list[int]:
    """The pids whose command line (as the process set it, e.g. through setproctitle) contains `title`."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if title in command:
            pids.append(int(entry.name))
    return sorted(pids)


def default_sigint() -> None:
    """`preexec_fn` for a child that is stopped with SIGINT: a process started in the background (`cmd &`, nohup)
    ignores SIGINT, and an ignored signal stays ignored across exec, so the child would never see the stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PySpyRecording:
    """`py-spy record` of one process while the `with` block runs (stopped with SIGINT, which makes it write)."""

    def __init__(self, py_spy: str, pid: int, output: Path, rate_hz: int = 200) -> None:
        self.command = [
            py_spy, "record", "--pid", str(pid), "--rate", str(rate_hz), "--format", "raw", "--threads",
            "--nonblocking", "--output", str(output),
        ]  # fmt: skip
        self.output, self.rate_hz = output, rate_hz
        self.log = output.with_suffix(".log")

    def __enter__(self) -> PySpyRecording:
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=default_sigint
            )
        self.seconds = 0.0
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self._started
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def describe(self) -> list[str]:
        """`describe` of what was recorded, or why nothing was (py-spy's own words are in its log)."""
        if not self.output.exists():
            last = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.exists() else []
            return [
                f"py-spy wrote nothing (exit {self.process.returncode}): {' '.join(last) or 'no output'}; {self.log}"
            ]
        return describe(parse_raw(self.output.read_text(errors="replace")), self.seconds, self.rate_hz)


@dataclass
class ThreadProfile:
    samples: int = 0
    inclusive: Counter = field(default_factory=Counter)  # function -> samples with it anywhere on the stack
    leaf: Counter = field(default_factory=Counter)  # function -> samples with it on top


def parse_raw(text: str) -> dict[str, ThreadProfile]:
    """py-spy's raw (collapsed) stacks, `thread (TID): NAME;frame;...;frame COUNT` per line, by thread name. A frame is
    `function (file:line)`; functions are keyed `function (file)` so a function's lines add up."""
    threads: dict[str, ThreadProfile] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames.pop(0).split(": ", 1)[-1] if frames[0].startswith("thread (") else "?"
        functions = [_function(frame) for frame in frames]
        profile = threads.setdefault(thread, ThreadProfile())
        n = int(count)
        profile.samples += n
        for function in set(functions):
            profile.inclusive[function] += n
        if functions:
            profile.leaf[functions[-1]] += n
    return threads


def _function(frame: str) -> str:
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def describe(threads: dict[str, ThreadProfile], seconds: float, rate_hz: int, top: int = 12) -> list[str]:
    """Per thread, busiest first: its busy share of the recording, then the functions holding most of it (leaving out
    the trunk, the frames on 95% of its stacks or more: the thread's loop and what calls it)."""
    lines = []
    possible = max(seconds * rate_hz, 1.0)
    for name, profile in sorted(threads.items(), key=lambda item: -item[1].samples):
        if profile.samples < 0.02 * possible:
            continue
        busy = f"busy {profile.samples / possible:.0%} of {seconds:.1f} s ({profile.samples} samples)"
        lines.append(f"thread {name}: {busy}")
        branches = [(f, n) for f, n in profile.inclusive.most_common() if n < 0.95 * profile.samples]
        for function, n in branches[:top]:
            lines.append(f"  {n / profile.samples:6.1%} in   {function}")
        for function, n in profile.leaf.most_common(top // 2):
            lines.append(f"  {n / profile.samples:6.1%} self {function}")
    return lines
