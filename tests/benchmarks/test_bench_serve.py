"""The serving benchmark's pieces that run anywhere: the tokenizer it serves with, the commands it starts,
the ratio table, and its refusal to measure a server it did not start (the servers themselves need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from benchmarks import bench_serve


def test_the_word_tokenizer_round_trips_every_id(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bench_serve.write_word_tokenizer(500, tmp_path))
    ids = [random.Random(0).randrange(500) for _ in range(2000)]
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids
    assert tokenizer.all_special_ids == [] and tokenizer.num_special_tokens_to_add() == 0


def test_no_prompt_exceeds_vllms_character_bound(tmp_path):
    """vLLM refuses, before tokenizing, a prompt of more than `max_input_tokens * max_chars_per_token`
    characters (the longest token string). vLLM's random dataset sends runs of consecutive ids; the widest
    (six-digit) words must still fit, or long prompts at `max_model_len` come back as "Bad Request"."""
    from transformers import AutoTokenizer

    vocab_size = 157184
    tokenizer = AutoTokenizer.from_pretrained(bench_serve.write_word_tokenizer(vocab_size, tmp_path))
    max_chars_per_token = max(len(token) for token in tokenizer.get_vocab())  # as vLLM computes it
    ids = list(range(vocab_size - 4096, vocab_size))
    text = tokenizer.decode(ids)
    assert len(text) <= len(ids) * max_chars_per_token
    assert tokenizer.encode(text, add_special_tokens=False) == ids


def test_the_twin_is_the_same_config_on_vllms_native_architecture(tmp_path):
    ours = json.loads((bench_serve.write_model_dir("ring-linear", tmp_path / "a") / "config.json").read_text())
    twin = json.loads((bench_serve.write_model_dir("softmax-twin", tmp_path / "b") / "config.json").read_text())
    assert ours["architectures"] == ["BailingMoeLinearV2ForCausalLM"]
    assert twin["architectures"] == ["BailingMoeV2ForCausalLM"]
    assert {k: v for k, v in twin.items() if k != "architectures"} == {
        k: v for k, v in ours.items() if k != "architectures"
    }


def test_the_configs_cover_the_longest_workload(tmp_path):
    def positions(model: str, max_len: int) -> int:
        directory = bench_serve.write_model_dir(model, tmp_path / f"{model}-{max_len}", max_len=max_len)
        return json.loads((directory / "config.json").read_text())["max_position_embeddings"]

    longest = max(w.input_len + w.output_len for w in bench_serve.WORKLOADS.values())
    assert positions("ring-linear", longest) == positions("softmax-twin", longest) == longest > 131072
    assert positions("softmax-twin", 4352) == 131072


def test_prefix_caching_is_off_except_for_the_cached_twin():
    def command(model: str) -> list[str]:
        return bench_serve.serve_command(model, Path("m"), Path("t"), 8000, 4352)

    assert "--no-enable-prefix-caching" in command("ring-linear")
    assert "--no-enable-prefix-caching" in command("softmax-twin")
    assert "--no-enable-prefix-caching" not in command("softmax-twin-cached")
    assert command("ring-linear")[command("ring-linear").index("--load-format") + 1] == "dummy"


def test_the_client_is_vllms_own_with_the_workload_shape():
    chat = bench_serve.WORKLOADS["chat"]
    command = bench_serve.client_command(chat, Path("m"), Path("t"), 8000, Path("o"), "x.json")
    assert command[1:5] == ["-m", "vllm.entrypoints.cli.main", "bench", "serve"]
    flags = dict(zip(command[5::2], command[6::2], strict=False))
    assert flags["--random-input-len"] == "4096" and flags["--random-output-len"] == "256"
    assert flags["--max-concurrency"] == "64" and flags["--num-prompts"] == "256"
    assert "--ignore-eos" in command and flags["--dataset-name"] == "random"


def _result(throughput: float, ttft: float, tpot: float) -> dict:
    return {
        "output_throughput": throughput,
        "mean_ttft_ms": ttft,
        "p99_ttft_ms": 2 * ttft,
        "mean_tpot_ms": tpot,
        "p99_tpot_ms": 2 * tpot,
    }


def test_the_table_gives_ring_linears_advantage_in_the_direction_of_better():
    results = {
        ("ring-linear", "chat", "warm"): _result(2000.0, 100.0, 5.0),
        ("softmax-twin", "chat", "warm"): _result(1000.0, 300.0, 10.0),
        ("softmax-twin-cached", "chat", "warm"): _result(4000.0, 50.0, 5.0),
        ("ring-linear", "long-32k", "cold"): _result(1.0, 1.0, 1.0),  # no twin row: left out
    }
    table = bench_serve.report_table(results)
    assert "| chat | warm | output_throughput | 2,000.0 | 1,000.0 | 2.00x |" in table
    assert "| chat | warm | mean_ttft_ms | 100.0 | 300.0 | 3.00x |" in table  # lower latency is better
    assert "| chat | warm | mean_tpot_ms | 5.0 | 10.0 | 2.00x |" in table
    assert "long-32k" not in table.split("\n\n")[0]
    assert "| chat | 4,000 |" in table  # the cached twin's figure stays visible


def test_live_compiles_are_read_from_vllms_jit_monitor_lines():
    log = (
        "(EngineCore pid=1) WARNING [jit_monitor.py:135] Triton kernel JIT compilation during inference: "
        "_segment_scan_kernel. This causes a latency spike\nINFO other line\n"
        "(EngineCore pid=1) WARNING [jit_monitor.py:135] Triton kernel JIT compilation during inference: "
        "fused_moe_kernel. This causes a latency spike\n"
    )
    assert bench_serve.live_compiles(log) == ["_segment_scan_kernel.", "fused_moe_kernel."]


def test_a_compile_is_counted_in_the_pass_whose_log_lines_hold_it(tmp_path):
    log = tmp_path / "server.log"
    line = "WARNING [jit_monitor.py:135] Triton kernel JIT compilation during inference: fused_moe_kernel. Spike\n"
    log.write_text("INFO start-up\n")
    cold = bench_serve.log_size(log)
    with open(log, "a") as f:
        f.write("INFO serving\n" + line)
    warm = bench_serve.log_size(log)
    with open(log, "a") as f:
        f.write("INFO serving\n")
    assert bench_serve.compiles_between(log, cold, warm) == ["fused_moe_kernel."]
    assert bench_serve.compiles_between(log, warm, bench_serve.log_size(log)) == []
    assert bench_serve.log_size(tmp_path / "absent.log") == 0


def test_a_pass_in_which_either_server_compiled_has_its_ratios_marked(tmp_path):
    results = {
        ("ring-linear", "chat", "warm"): _result(4410.0, 1079.0, 10.3),
        ("softmax-twin", "chat", "warm"): _result(4015.0, 1275.0, 10.9),
        ("ring-linear", "chat", "cold"): _result(4206.0, 1153.0, 10.7),
        ("softmax-twin", "chat", "cold"): _result(3521.0, 1365.0, 12.7),
    }
    summaries = {
        "ring-linear": {"chat/cold": [], "chat/warm": []},
        "softmax-twin": {"chat/cold": [], "chat/warm": ["fused_moe_kernel."]},
    }
    for model, by_pass in summaries.items():
        (tmp_path / f"summary-{model}.json").write_text(json.dumps({"model": model, "live_compiles_by_pass": by_pass}))
    (tmp_path / "summary-old-run.json").write_text(json.dumps({"model": "old-run"}))  # recorded before the split
    compiles = bench_serve.load_live_compiles(tmp_path)
    assert compiles[("softmax-twin", "chat", "warm")] == ["fused_moe_kernel."]
    table = bench_serve.report_table(results, compiles=compiles)
    assert "| chat | warm | output_throughput | 4,410.0 | 4,015.0 | 1.10x (compiled live: softmax-twin) |" in table
    assert "| chat | cold | output_throughput | 4,206.0 | 3,521.0 | 1.19x |" in table


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_port_that_already_answers_is_refused_before_anything_starts(tmp_path):
    """A leftover server would answer for the new one: the numbers would be another model's."""
    server = HTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SystemExit, match="already answers on port"):
            bench_serve.main(
                ["run", "--model", "ring-linear", "--port", str(server.server_port), "--out", str(tmp_path)]
            )
    finally:
        server.shutdown()
    assert not any(tmp_path.iterdir())


def test_on_sglang_the_server_and_client_are_sglangs_own():
    server = bench_serve.serve_command("ring-linear", Path("m"), Path("t"), 8000, 4352, engine="sglang")
    assert server[1:3] == ["-m", "sglang.launch_server"] and "--disable-radix-cache" in server
    assert "--disable-radix-cache" not in bench_serve.serve_command(
        "ring-linear-cached", Path("m"), Path("t"), 1, 2, "sglang"
    )
    assert server[server.index("--load-format") + 1] == "dummy"
    chat = bench_serve.WORKLOADS["chat"]
    client = bench_serve.client_command(chat, Path("m"), Path("t"), 8000, Path("o"), "x.json", engine="sglang")
    assert client[1:3] == ["-m", "sglang.benchmark.serving"]

    def flag(name: str) -> str:
        return client[client.index(name) + 1]

    assert flag("--backend") == "sglang" and flag("--warmup-requests") == "0"  # the cold pass stays cold
    # token ids without a ShareGPT download, at fixed lengths (SGLang's ratio 1 is vLLM's 0)
    assert flag("--dataset-name") == "random-ids" and flag("--random-range-ratio") == "1"
    assert flag("--random-input-len") == "4096" and flag("--output-file") == str(Path("o") / "x.json")


def test_results_are_read_from_vllms_json_and_sglangs_json_lines(tmp_path):
    chat = bench_serve.WORKLOADS["chat"]
    (tmp_path / "a.json").write_text(json.dumps(_result(1.0, 2.0, 3.0) | {"failed": 0}, indent=1))
    assert bench_serve.read_result(tmp_path / "a.json", chat)["output_throughput"] == 1.0
    lines = [
        json.dumps(_result(9.0, 9.0, 9.0) | {"completed": 1}),
        json.dumps(_result(5.0, 6.0, 7.0) | {"completed": 250}),
    ]
    (tmp_path / "b.json").write_text("\n".join(lines))
    result = bench_serve.read_result(tmp_path / "b.json", chat)
    assert result["output_throughput"] == 5.0 and result["failed"] == 6  # 256 prompts, 250 completed


def test_on_sglang_the_twin_is_the_native_moe_model_with_its_config_class_beside_it(tmp_path):
    ours_dir = bench_serve.write_model_dir("ring-linear", tmp_path / "a", "sglang")
    ours = json.loads((ours_dir / "config.json").read_text())
    twin_dir = bench_serve.write_model_dir("softmax-twin", tmp_path / "b", "sglang")
    twin = json.loads((twin_dir / "config.json").read_text())
    assert ours["model_type"] == "bailing_moe_linear" and twin["model_type"] == "bailing_moe_v2"
    assert twin["architectures"] == ["BailingMoeV2ForCausalLM"]
    module, cls = twin["auto_map"]["AutoConfig"].split(".")
    assert (twin_dir / f"{module}.py").is_file() and cls == "BailingMoeV2Config"
    differs = {"architectures", "model_type", "auto_map"}
    assert {k: v for k, v in twin.items() if k not in differs} == {k: v for k, v in ours.items() if k not in differs}
    assert "--trust-remote-code" in bench_serve.serve_command("softmax-twin", twin_dir, Path("t"), 1, 2, "sglang")
    assert "--trust-remote-code" not in bench_serve.serve_command("ring-linear", twin_dir, Path("t"), 1, 2, "sglang")
    assert bench_serve.label("ring-linear", "sglang") == "ring-linear.sglang"
    assert bench_serve.label("ring-linear", "vllm") == "ring-linear"


def test_a_run_that_lost_requests_gets_no_ratio():
    """Refused requests mean less work measured (run K's twin at 32K lost 18 of 32): figures, but no ratio."""
    results = {
        ("ring-linear", "long-32k", "warm"): _result(793.0, 2000.0, 12.0) | {"failed": 0},
        ("softmax-twin", "long-32k", "warm"): _result(552.0, 2700.0, 14.0) | {"failed": 18},
    }
    table = bench_serve.report_table(results)
    assert "| long-32k | warm | output_throughput | 793.0 | 552.0 | none (softmax-twin: 18 failed) |" in table


def test_the_memory_sampler_reports_growth_and_samples_nothing_without_nvidia_smi(monkeypatch):
    sampler = bench_serve.GpuMemorySampler()
    sampler.samples = [1000, 1000, 1010, 1200, 1300, 1400, 1400, 1400]
    assert sampler.describe() == "min 1000, max 1400, last quarter - first quarter +400"
    monkeypatch.setenv("PATH", "/nonexistent")
    with bench_serve.GpuMemorySampler(period_s=0.01) as empty:
        pass
    assert empty.samples == []


def test_sglangs_client_gets_a_datasets_stub_only_where_datasets_is_missing(monkeypatch):
    env = {"PYTHONPATH": "/site"}
    assert bench_serve.client_env("vllm", env) == env
    monkeypatch.setattr(bench_serve.importlib.util, "find_spec", lambda name: None)
    stubbed = bench_serve.client_env("sglang", env)
    assert stubbed["PYTHONPATH"] == f"{bench_serve.OFFLINE_STUBS}{os.pathsep}/site"
    assert bench_serve.client_env("vllm", env) == env
    monkeypatch.setattr(bench_serve.importlib.util, "find_spec", lambda name: object())
    assert bench_serve.client_env("sglang", env) == env


def test_the_datasets_stub_fails_on_use_naming_itself():
    stub_file = bench_serve.OFFLINE_STUBS / "datasets" / "__init__.py"
    spec = importlib.util.spec_from_file_location("stub_datasets", stub_file)
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    with pytest.raises(ModuleNotFoundError, match="offline_stubs"):
        stub.load_dataset("MMMU/MMMU")


def test_prefix_workloads_use_vllms_prefix_repetition_dataset_and_only_on_vllm():
    workload = bench_serve.WORKLOADS["prefix-32k"]
    command = bench_serve.client_command(workload, Path("m"), Path("t"), 8000, Path("o"), "x.json")
    flags = {flag: command[i + 1] for i, flag in enumerate(command[:-1]) if flag.startswith("--")}
    assert flags["--dataset-name"] == "prefix_repetition"
    assert flags["--prefix-repetition-prefix-len"] == "31744" and flags["--prefix-repetition-suffix-len"] == "1024"
    assert flags["--prefix-repetition-num-prefixes"] == "4" and flags["--prefix-repetition-output-len"] == "256"
    with pytest.raises(ValueError, match="prefix-32k workload runs on vLLM only"):
        bench_serve.client_command(workload, Path("m"), Path("t"), 8000, Path("o"), "x.json", engine="sglang")


def test_the_cached_ring_linear_server_asks_for_prefix_caching():
    command = bench_serve.serve_command("ring-linear-cached", Path("m"), Path("t"), 8000, 4352)
    assert "--enable-prefix-caching" in command and "--no-enable-prefix-caching" not in command
    assert bench_serve.server_env("ring-linear-cached", {}) == {}


def test_each_pass_reads_hits_steps_and_preemptions_from_vllms_prometheus_counters():
    def page(hits: float, steps: float, tokens: float) -> str:
        return "\n".join(
            [
                "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in tokens.",
                f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}',
                'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 4096.0',
                'vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9',
                f'vllm:iteration_tokens_total_count{{engine="0",model_name="m"}} {steps}',
                f'vllm:iteration_tokens_total_sum{{engine="0",model_name="m"}} {tokens}',
                'vllm:iteration_tokens_total_bucket{engine="0",le="8.0",model_name="m"} 3.0',
                'vllm:num_preemptions_total{engine="0",model_name="m"} 0.0',
            ]
        )

    before = bench_serve.counter_totals(page(0.0, 10.0, 100.0))
    after = bench_serve.counter_totals(page(1536.0, 30.0, 8100.0)) | {"cache_queries": 8192.0}
    done = bench_serve.pass_counters(before, after)
    assert done == {
        "cache_hits": 1536.0,
        "cache_queries": 4096.0,
        "steps": 20.0,
        "step_tokens": 8000.0,
        "preemptions": 0.0,
    }
    assert bench_serve.describe_counters(done) == [
        "prefix-cache hit rate: 37.5% of prompt tokens",
        "engine steps: 20, 400 tokens a step, 0 preemptions",
    ]
    assert bench_serve.counter_totals("vllm:num_requests_running 0.0") is None
    assert bench_serve.pass_counters(None, after) == {} and bench_serve.describe_counters({}) == []


def test_ring_flash_is_served_from_its_preset_at_a_chosen_depth_with_fp8():
    config = bench_serve.model_config("flash", layers=16)
    assert config["hidden_size"] == 4096 and config["num_hidden_layers"] == 16
    assert config["model_type"] == "bailing_moe_linear" and config["architectures"] == ["BailingMoeLinearV2ForCausalLM"]
    with pytest.raises(SystemExit, match="multiple of flash's layer group \\(8\\)"):
        bench_serve.model_config("flash", layers=12)
    assert bench_serve.variant() == "" and bench_serve.variant("flash", 16, "fp8") == "-flash-16l-fp8"
    assert bench_serve.label("ring-linear", "vllm", "-flash-fp8") == "ring-linear-flash-fp8"
    command = bench_serve.serve_command("softmax-twin", Path("m"), Path("t"), 8000, 4352, quantization="fp8")
    assert command[command.index("--quantization") + 1] == "fp8"


def test_every_ring_linear_run_is_paired_with_the_twin_of_its_variant_and_engine():
    labels = {
        "ring-linear", "softmax-twin", "ring-linear-cached", "softmax-twin-cached", "ring-linear.sglang",
        "softmax-twin.sglang", "ring-linear-flash-fp8", "softmax-twin-flash-fp8", "ring-linear-flash",
        "ring-linear-aligned", "ring-linear-aligned-flash",
    }  # fmt: skip
    assert set(bench_serve.pairs(labels)) == {
        ("ring-linear-aligned", "ring-linear"),
        ("ring-linear-aligned-flash", "ring-linear-flash"),
        ("ring-linear", "softmax-twin"),
        ("ring-linear-cached", "softmax-twin-cached"),
        ("ring-linear.sglang", "softmax-twin.sglang"),
        ("ring-linear-flash-fp8", "softmax-twin-flash-fp8"),
        ("ring-linear.sglang", "ring-linear"),
    }


def test_the_servers_memory_lines_are_kept():
    log = "\n".join(
        [
            "(EngineCore pid=1) INFO 11-29 [gpu_model_runner.py:1] Model loading took 55.21 GiB memory and 30 s",
            "INFO [kv_cache_utils.py:2] GPU KV cache size: 1,234,567 tokens",
            "INFO [kv_cache_utils.py:3] Maximum concurrency for 33,024 tokens per request: 37.4x",
            "INFO unrelated line",
        ]
    )
    lines = bench_serve.memory_lines(log)
    assert len(lines) == 3 and lines[2] == "Maximum concurrency for 33,024 tokens per request: 37.4x"


def test_the_aligned_server_differs_from_the_default_one_by_aligned_mode_alone():
    command = bench_serve.serve_command("ring-linear-aligned", Path("m"), Path("t"), 8000, 4352)
    assert command == bench_serve.serve_command("ring-linear", Path("m"), Path("t"), 8000, 4352)
    assert bench_serve.server_env("ring-linear-aligned", {}) == {"RING_LINEAR_ALIGNED": "1"}
    assert bench_serve.server_env("ring-linear", {}) == {}


def test_the_host_probe_samples_a_python_process_and_a_pass_reads_its_deltas(tmp_path):
    """The probe (the server's sitecustomize) writes a line per period with CPU, GC and memory; a pass's line is
    the difference across it, and a process that did nothing during the pass is left out."""
    import subprocess
    import sys
    import time

    folder = tmp_path / "probe"
    env = bench_serve.probe_env(dict(os.environ), folder)
    busy = "import gc, time\nend = time.time() + 3.5\nwhile time.time() < end:\n    gc.collect(0)\n"
    start = time.time()
    subprocess.run([sys.executable, "-c", busy], env=env, check=True, timeout=60)
    (path,) = folder.glob("*.jsonl")
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(samples) >= 2 and samples[-1]["cpu_s"] > samples[0]["cpu_s"] and samples[-1]["gc_ms"][0] > 0
    (line,) = bench_serve.process_lines(folder, start, time.time(), min_cpu_s=0.5)
    assert f"pid {path.stem}" in line and "collections (gen 0/1/2)" in line
    assert bench_serve.process_lines(folder, start, time.time(), min_cpu_s=60) == []


def test_token_gaps_separate_an_even_slowdown_from_stalls():
    even = bench_serve.token_gaps({"itls": [[0.01] * 100, [0.01] * 100]})
    stalled = bench_serve.token_gaps({"itls": [[0.01] * 99 + [1.0], [0.01] * 100]})
    assert "median 10.00" in even and "0.0% of the decode time" in even
    assert "median 10.00" in stalled and "max 1000.0" in stalled and "33.4% of the decode time" in stalled
    assert bench_serve.token_gaps({"mean_tpot_ms": 1.0}) is None


def test_stopping_a_server_that_already_died_leaves_its_error_alone():
    """A server that failed to start has no process group left: stopping it must not raise (run AA: a
    `ProcessLookupError` from the clean-up hid why the server had died)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    dead.wait()
    bench_serve.stop_server(dead)  # raises ProcessLookupError without the guard
    # it says when it runs, so its session (and process group) exists before the stop (a stop that raced the
    # child's setsid() would find no group); it takes SIGINT as a server does, even where this test runs with SIGINT
    # ignored (a background job of a non-interactive shell), which a child would inherit
    child = (
        "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "print('up', flush=True); time.sleep(60)"
    )
    alive = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, start_new_session=True, text=True)
    assert alive.stdout.readline() == "up\n"
    bench_serve.stop_server(alive)
    assert alive.poll() is not None
    alive.stdout.close()


def test_a_prefix_match_unit_reaches_the_cached_vllm_server_and_names_its_runs():
    command = bench_serve.serve_command("ring-linear-cached", Path("m"), Path("t"), 8000, 4352, prefix_match_unit=16)
    assert command[command.index("--prefix-match-unit") + 1] == "16" and "--enable-prefix-caching" in command
    assert "--prefix-match-unit" not in bench_serve.serve_command("ring-linear-cached", Path("m"), Path("t"), 1, 2)
    suffix = bench_serve.variant(prefix_match_unit=16)
    assert suffix == "-unit16"
    assert ("ring-linear-cached-unit16", "softmax-twin-cached-unit16") in bench_serve.pairs(
        {"ring-linear-cached" + suffix, "softmax-twin-cached" + suffix}
    )


@pytest.mark.parametrize("model, engine", [("ring-linear", "vllm"), ("ring-linear-cached", "sglang")])
def test_a_prefix_match_unit_without_vllm_prefix_caching_is_refused_before_a_server_starts(tmp_path, model, engine):
    argv = ["run", "--model", model, "--engine", engine, "--out", str(tmp_path / "out"), "--prefix-match-unit", "16"]
    with pytest.raises(SystemExit, match=f"--prefix-match-unit is vLLM's prefix-caching flag; --model {model}"):
        bench_serve.run(bench_serve.parser().parse_args(argv))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, switch, value, suffix, what",
    [
        ("unstacked_states", "RING_LINEAR_STACKED_STATES", "0", "-unstacked", "vLLM cache layout"),
        ("fp32_router", "RING_LINEAR_ROUTER_PRODUCTS", "fp32", "-fp32-router", "router GEMM"),
    ],
)
def test_a_default_turned_back_is_named_to_the_server_and_paired_with_the_default_run_and_the_twin(
    tmp_path, flag, switch, value, suffix, what
):
    """`--unstacked-states` and `--fp32-router` serve a plugin default as it was before (`PREVIOUS_DEFAULTS`)."""
    for shell in ("1", value):  # the plugin's default, not the shell's
        assert bench_serve.server_env("ring-linear-cached", {switch: shell}) == {}
    keyword = flag.removesuffix("_states")  # server_env's and variant's name for it
    assert bench_serve.server_env("ring-linear", {}, **{keyword: True}) == {switch: value}
    assert bench_serve.server_env("softmax-twin", {}) == {}
    assert bench_serve.variant(prefix_match_unit=16, **{keyword: True}) == f"-unit16{suffix}"
    assert bench_serve.variant(unstacked=True, fp32_router=True) == "-unstacked-fp32-router"
    labels = {f"ring-linear-cached-unit16{suffix}", "ring-linear-cached-unit16", "softmax-twin-cached-unit16"}
    assert set(bench_serve.pairs(labels)) == {
        ("ring-linear-cached-unit16", "softmax-twin-cached-unit16"),
        ("ring-linear-cached-unit16", f"ring-linear-cached-unit16{suffix}"),
        (f"ring-linear-cached-unit16{suffix}", "softmax-twin-cached-unit16"),
    }
    option = "--" + flag.replace("_", "-")
    argv = ["run", "--model", "softmax-twin", "--out", str(tmp_path / "o"), option]
    with pytest.raises(SystemExit, match=f"{option} is ring-linear's {what}; --model softmax-twin"):
        bench_serve.run(bench_serve.parser().parse_args(argv))
    assert not (tmp_path / "o").exists()
