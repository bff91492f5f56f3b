"""`server_hooks/sync_watch.py`: the synchronising calls a served engine makes, counted by stack (the GPU side, torch's
sync debug mode, runs only on a GPU; here the counting, the report and how bench_serve turns it on)."""

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from benchmarks import bench_serve
from benchmarks.server_hooks import sync_watch


def a_step_that_reads_the_gpu():
    warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)


def test_each_synchronising_call_is_counted_by_its_stack_and_other_warnings_still_show(monkeypatch):
    monkeypatch.setattr(sync_watch, "_counts", sync_watch.Counter())
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        show_others = functools.partial(sync_watch._record, _show=lambda *b: shown.append(str(b[0])))
        monkeypatch.setattr(warnings, "showwarning", show_others)
        for _ in range(3):
            a_step_that_reads_the_gpu()
        warnings.warn("something else", UserWarning, stacklevel=1)
    ((stack, count),) = sync_watch._counts.items()
    assert count == 3 and stack.startswith("test_sync_watch.py:17 a_step_that_reads_the_gpu < test_sync_watch.py:")
    assert shown == ["something else"]


def test_the_report_lists_each_process_busiest_stack_first(tmp_path):
    (tmp_path / "11.json").write_text(json.dumps({"model_runner.py:9 prepare < core.py:3 step": 640, "x.py:1 f": 2}))
    (tmp_path / "12.json").write_text("{}")  # a process that never waited
    (tmp_path / "on").touch()
    lines = sync_watch.describe(str(tmp_path))
    assert lines == ["pid 11: 642 synchronising calls", "      640  model_runner.py:9 prepare < core.py:3 step",
                     "        2  x.py:1 f"]  # fmt: skip


def test_the_hook_waits_for_the_servers_ready_signal_in_every_process(tmp_path):
    """A process with the switch starts the watcher, which stays off (writes nothing) while `on` is missing; without
    CUDA it stays off after `on` too (nothing to watch)."""
    env = bench_serve.sync_watch_env(dict(os.environ), tmp_path / "w")
    assert env["RING_LINEAR_SYNC_WATCH"] == str(tmp_path / "w")
    code = "import threading, time; time.sleep(1.5); print(sorted(t.name for t in threading.enumerate()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "ring-linear-sync-watch" in out
    assert Path(tmp_path / "w").is_dir() and list((tmp_path / "w").iterdir()) == []


def test_bench_serve_has_the_switch():
    args = bench_serve.parser().parse_args(["run", "--model", "ring-linear", "--sync-watch"])
    assert args.sync_watch
