"""`served_timeline`: a served step's period against the GPU's busy time in it, from a vLLM worker trace."""

import gzip
import json

import pytest

from benchmarks import served_timeline


def trace_events() -> list[dict]:
    """Three steps 10 ms apart (two decode-only, one with a 512-token prefill), then a fourth that only closes the
    third's period; the GPU works 4 ms of the first period (two overlapping kernels and a copy), 9 of the second."""

    def step(ts, name, dur):
        return {"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur}

    def gpu(ts, dur, name="k", cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    return [
        step(0, "execute_context_0(0)_generation_64(64)", 3000),
        step(10000, "execute_context_0(0)_generation_64(64)", 2000),
        step(20000, "execute_context_1(512)_generation_63(63)", 5000),
        step(30000, "execute_context_0(0)_generation_64(64)", 2000),
        {**step(1000, "execute_context_0(0)_generation_64(64)", 4000), "cat": "gpu_user_annotation"},  # not a step
        gpu(1000, 2000, "moe"),
        gpu(2000, 2000, "moe"),
        gpu(4000, 1000, "copy", "gpu_memcpy"),  # union 4 ms
        gpu(10500, 9000, "attn"),  # 9 ms
        gpu(20000, 9500, "attn"),
        gpu(30500, 100, "late"),  # the last one is outside every kept period
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50},
    ]


def test_each_periods_gpu_busy_time_is_the_union_of_its_work(tmp_path):
    path = tmp_path / "worker.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": trace_events()}, f)
    steps = served_timeline.steps_of(served_timeline.load_events(path))
    assert [s.period_us for s in steps] == [10000, 10000, 10000]
    intervals = served_timeline.gpu_intervals(served_timeline.load_events(path))
    assert [served_timeline.busy_within(intervals, s.start_us, s.start_us + s.period_us) for s in steps] == [
        4000,
        9000,
        9500,
    ]
    lines = served_timeline.describe(path)
    assert lines[0] == "worker.pt.trace.json.gz: 3 steps"
    assert lines[1] == (
        "  decode-only (2 steps, median 64 decoding): period 10.00 ms, GPU busy 6.50 ms (65% of the time), "
        "execute_model on the host 2.50 ms (medians)"
    )
    assert lines[2].startswith("  with a prefill (1 steps, median 63 decoding): period 10.00 ms, GPU busy 9.50 ms (95%")
    assert lines[3] == "  GPU work by kernel over these steps (of 23.5 ms):"
    assert lines[4].split() == ["78.7%", "6166.7", "us/step", "attn"]
    assert "late" not in "\n".join(lines)


def test_a_trace_without_engine_steps_says_so(tmp_path):
    path = tmp_path / "frontend.json"
    path.write_text(json.dumps([{"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 1}]))
    assert served_timeline.describe(path) == ["frontend.json: no engine steps (no execute_context_* ranges): not a "
                                              "vLLM worker trace"]  # fmt: skip


@pytest.mark.parametrize("argv", [["--engine", "sglang"]])
def test_the_profile_is_refused_where_no_vllm_trace_comes_back(tmp_path, argv):
    from benchmarks import bench_serve

    args = ["run", "--model", "ring-linear", "--out", str(tmp_path / "o"), "--torch-profile", *argv]
    with pytest.raises(SystemExit, match="--torch-profile reads vLLM's profiler traces"):
        bench_serve.run(bench_serve.parser().parse_args(args))


def test_the_server_profiles_the_worker_alone_from_a_delay(tmp_path):
    from pathlib import Path

    from benchmarks import bench_serve

    command = bench_serve.serve_command("ring-linear", Path("m"), Path("t"), 1, 2, profile_dir=tmp_path / "p")
    config = json.loads(command[command.index("--profiler-config") + 1])
    assert config["profiler"] == "torch" and config["torch_profiler_dir"] == str((tmp_path / "p").resolve())
    assert config["ignore_frontend"] and not config["torch_profiler_with_stack"]
    assert (config["delay_iterations"], config["max_iterations"]) == (300, 50)
    assert "--profiler-config" not in bench_serve.serve_command("ring-linear", Path("m"), Path("t"), 1, 2)
