"""Serving speed as users measure it: `vllm serve` on dummy weights at the real Ring-mini sizes, driven by
vLLM's own client (`vllm bench serve`, random dataset, `--ignore-eos`), Ring-linear against its softmax twin.

Models (`--model`, one server each, prefix caching off unless the name says cached):
- `ring-linear`: Ring-mini-linear-2.0 through this plugin;
- `softmax-twin`: Ring-mini-2.0's shape on vLLM's native `BailingMoeV2ForCausalLM` (the same config with its
  architecture swapped), `--no-enable-prefix-caching`;
- `softmax-twin-cached`: the twin with vLLM's default prefix caching, whose warm pass re-sends the same
  prompts (the figure Ring-linear's caching must reach);
- `ring-linear-cached`: ours with vLLM's hybrid prefix caching ("align" mode);
- `ring-linear-aligned`: ours in aligned mode (`RING_LINEAR_ALIGNED=1`, which brings vLLM's batch invariance;
  otherwise the same flags), reported against `ring-linear`: what bitwise rollouts cost
  (issue 15's target: at most 1.35x slower).

The `prefix-*` workloads (vLLM's `prefix_repetition` dataset: prompts that share a few long prefixes) are for
the cached pair.

Routing (`--routing`): the engines' dummy weights give every MoE layer the same expert bias, which sends every token
to the same 8 or 9 experts; `spread` (the default) zeroes that bias after the fill, so the MoE layers read as many
experts as a trained model's do (`server_hooks/spread_routing.py`, on vLLM's and SGLang's dummy loaders). Runs with
`--routing dummy` carry `-dummy-routing` in their names and pair only with each other; `--routing scaled` also scales
the routers to unit-deviation logits (`-scaled-routing`).

Each workload runs twice: a cold pass (every workload in turn, right after the server starts: the first time
the server sees that shape) and then a warm pass over the same prompts. Server and client share a word-level
tokenizer (`t0` .. `t{V-1}`, whitespace split), which round-trips every id, as the random dataset needs.

    python -m benchmarks.bench_serve run --model ring-linear --out serve-results     # one server, all workloads
    python -m benchmarks.bench_serve run --model softmax-twin --out serve-results
    python -m benchmarks.bench_serve run --model ring-linear --engine sglang --out serve-results  # launch_server
    python -m benchmarks.bench_serve report serve-results                              # ratios, markdown

On SGLang (`--engine sglang`: `sglang.launch_server` and `python -m sglang.benchmark.serving`, the triton
attention backend, radix cache off unless the name says cached) the twin is SGLang's native
`BailingMoeV2ForCausalLM`, whose config SGLang reads as remote code: `sglang_twin/` holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks import host_profile, served_timeline
from benchmarks.server_hooks import process_probe, sync_watch
from common_kernels.ops.moe.router_gemm import ROUTER_PRODUCTS_SWITCH
from common_kernels.serving import ALIGNED_MODE_SWITCH, STACKED_STATES_SWITCH

RELEASED_CONFIG = Path(__file__).parents[1] / "tests" / "data" / "ring-mini-linear-2.0.config.json"
MODELS = ("ring-linear", "softmax-twin", "ring-linear-cached", "softmax-twin-cached", "ring-linear-aligned")
ENGINES = ("vllm", "sglang")
PASSES = ("cold", "warm", "warm2")  # warm2: a third pass, for a trend across passes
METRICS = ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms")
HIGHER_IS_BETTER = {"output_throughput"}
VLLM_CLI = (sys.executable, "-m", "vllm.entrypoints.cli.main")  # `vllm`, also where only the package is on the path


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    output_len: int
    num_prompts: int
    concurrency: int
    warm_pass: bool = True  # False: run once (the soak)
    prefix_len: int = 0  # > 0: vLLM's prefix_repetition dataset, `num_prefixes` prefixes shared by the prompts
    num_prefixes: int = 0


WORKLOADS = {
    w.name: w
    for w in (
        Workload("chat", 4096, 256, 256, 64),
        Workload("long-32k", 32768, 256, 32, 16),
        Workload("long-128k", 131072, 256, 8, 4),
        Workload("reasoning", 16384, 4096, 64, 64),
        # shared prefixes (issue 13): 8 system prompts of 3.5K / 4 documents of 31K, each followed by its own question
        Workload("prefix-4k", 4096, 256, 256, 64, prefix_len=3584, num_prefixes=8),
        Workload("prefix-32k", 32768, 256, 32, 16, prefix_len=31744, num_prefixes=4),
        # at least 5 minutes of traffic at concurrency 128 on one H200 (RESULTS.md, run N, times the client):
        # 0 failed requests and flat GPU memory expected
        Workload("soak", 1024, 256, 14000, 128, warm_pass=False),
    )
}
SPEED_WORKLOADS = ("chat", "long-32k", "long-128k", "reasoning")  # the default: the ratio table's rows


SGLANG_TWIN_CONFIG = Path(__file__).parent / "sglang_twin" / "configuration_bailing_moe_v2.py"
OFFLINE_STUBS = Path(__file__).parent / "offline_stubs"  # `datasets`, which SGLang's client imports and we never use


SIZES = ("mini", "flash")  # Ring-mini-linear-2.0 (the released config) or Ring-flash-linear-2.0 (its preset)


def model_config(size: str = "mini", layers: int | None = None) -> dict:
    """The served config: the released Ring-mini-linear config or the Ring-flash preset, at `layers` depth when
    given (a whole number of layer groups, so the softmax/linear pattern is the model's)."""
    if size == "mini":
        config = json.loads(RELEASED_CONFIG.read_text())
    else:
        from common_kernels.presets import preset_json

        config = preset_json("ring-flash-linear-2.0")
    if layers is not None:
        group = config["layer_group_size"]
        if layers <= 0 or layers % group:
            raise SystemExit(f"bench_serve: --layers must be a positive multiple of {size}'s layer group ({group})")
        config["num_hidden_layers"] = layers
    return config


def variant(
    size: str = "mini",
    layers: int | None = None,
    quantization: str | None = None,
    routing: str = "spread",
    prefix_match_unit: int | None = None,
    unstacked: bool = False,
    fp32_router: bool = False,
) -> str:
    """The suffix that names a model variant in files and tables: '' for Ring-mini at full depth unquantized with
    spread routing, block-grained cache hits and the plugin's defaults: its choice of cache layout (before run AH: one
    state an entry, now '-unstacked'; run AG's '-stacked' is what the plugin now picks with caching off) and the
    router on the tensor cores (before run AI: the fp32 GEMM, now '-fp32-router')."""
    parts = [] if size == "mini" else [size]
    parts += [f"{layers}l"] if layers is not None else []
    parts += [quantization] if quantization else []
    parts += [f"unit{prefix_match_unit}"] if prefix_match_unit is not None else []
    parts += [f"{routing}-routing"] if routing != "spread" else []
    parts += ["unstacked"] if unstacked else []
    parts += ["fp32-router"] if fp32_router else []
    return "".join(f"-{part}" for part in parts)


def write_model_dir(
    model: str, directory: Path, engine: str = "vllm", config: dict | None = None, max_len: int = 0
) -> Path:
    """config.json: `config` (default: the released Ring-mini-linear config), or the twin's architecture (on
    SGLang also its model type, with the config class SGLang loads as remote code beside it).

    `max_position_embeddings` is raised to `max_len` where that is longer: the 128K workload (131,072 + 256
    tokens) passes the released 131,072 by its output, and vLLM's own twin sizes its RoPE table by it (a
    position past it is a device-side assert, not a refusal), while ours sizes it by `max_model_len`."""
    config = dict(config or model_config())
    config["max_position_embeddings"] = max(config.get("max_position_embeddings", 0), max_len)
    directory.mkdir(parents=True, exist_ok=True)
    if model.startswith("softmax-twin"):
        config["architectures"] = ["BailingMoeV2ForCausalLM"]
        if engine == "sglang":
            config["model_type"] = "bailing_moe_v2"
            config["auto_map"] = {"AutoConfig": f"{SGLANG_TWIN_CONFIG.stem}.BailingMoeV2Config"}
            shutil.copy(SGLANG_TWIN_CONFIG, directory / SGLANG_TWIN_CONFIG.name)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_word_tokenizer(vocab_size: int, directory: Path) -> Path:
    """One word per id (`t0` .. `t{V-1}`), split at spaces: decode then encode gives back every id. Each word is
    stored with its leading space (`\u2581t17`, SentencePiece style), so no token takes more characters of text
    than its own string: vLLM refuses a prompt longer than `max_input_tokens * max_chars_per_token` characters
    before tokenizing it, and bare words would undercount the spaces (a 32K prompt of `t123456 ` words is 8
    characters per token against a bound of 7). In a folder of its own, so loading it never reads the model's
    config (whose type only the plugin knows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    space = "\u2581"
    tokenizer = Tokenizer(models.WordLevel({f"{space}t{i}": i for i in range(vocab_size)}, unk_token=f"{space}t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=space, prepend_scheme="always")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(directory)
    return directory


def serve_command(
    model: str,
    directory: Path,
    tokenizer: Path,
    port: int,
    max_model_len: int,
    engine: str = "vllm",
    quantization: str | None = None,
    prefix_match_unit: int | None = None,
    profile_dir: Path | None = None,
) -> list[str]:
    """The engine's OpenAI server on dummy weights; prefix caching off unless the model name says cached
    (`prefix_match_unit`: vLLM's `--prefix-match-unit`, cache hits finer than a block, for cached vLLM servers)."""
    cached = model.endswith("-cached")
    quantize = ["--quantization", quantization] if quantization else []
    if engine == "sglang":
        command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(directory)]
        command += ["--tokenizer-path", str(tokenizer), "--load-format", "dummy", "--port", str(port)]
        command += ["--context-length", str(max_model_len), "--attention-backend", "triton"]
        if model.startswith("softmax-twin"):
            command.append("--trust-remote-code")  # the twin's config class (write_model_dir)
        command += quantize
        return command if cached else [*command, "--disable-radix-cache"]
    command = [*VLLM_CLI, "serve", str(directory), "--tokenizer", str(tokenizer), "--load-format", "dummy"]
    command += ["--port", str(port)]
    command += ["--max-model-len", str(max_model_len), "--gpu-memory-utilization", "0.9", *quantize]
    if prefix_match_unit is not None:
        command += ["--prefix-match-unit", str(prefix_match_unit)]
    if profile_dir is not None:
        command += ["--profiler-config", json.dumps(profiler_config(profile_dir))]
    # hybrid models get no prefix caching unless asked for (vLLM 0.26)
    return [*command, "--enable-prefix-caching"] if cached else [*command, "--no-enable-prefix-caching"]


PROFILE_DELAY_STEPS, PROFILE_STEPS = 300, 50  # past a pass's admissions, into its steady decode


def profiler_config(directory: Path) -> dict:
    """vLLM's torch profiler on the engine's worker alone, `PROFILE_STEPS` steps from the `PROFILE_DELAY_STEPS`-th
    after the client's start, without Python stacks (their cost would land on the host side being measured)."""
    return {
        "profiler": "torch", "torch_profiler_dir": str(directory.resolve()), "torch_profiler_with_stack": False,
        "ignore_frontend": True, "delay_iterations": PROFILE_DELAY_STEPS, "max_iterations": PROFILE_STEPS,
    }  # fmt: skip


def server_env(model: str, env: dict[str, str], unstacked: bool = False, fp32_router: bool = False) -> dict[str, str]:
    """The server's environment: the aligned server runs aligned mode; ring-linear's cache layout and router GEMM are
    the plugin's defaults (`engine_config.stack_for`, `router_gemm`), or one state an entry when `unstacked` and the
    fp32 router GEMM when `fp32_router`, whatever the caller's shell says."""
    env = env | {ALIGNED_MODE_SWITCH: "1"} if model == "ring-linear-aligned" else env
    env = {name: value for name, value in env.items() if name not in (STACKED_STATES_SWITCH, ROUTER_PRODUCTS_SWITCH)}
    env = env | {STACKED_STATES_SWITCH: "0"} if unstacked else env
    return env | {ROUTER_PRODUCTS_SWITCH: "fp32"} if fp32_router else env


SERVER_HOOKS = Path(__file__).parent / "server_hooks"  # its sitecustomize runs in every server process


def hooks_env(env: dict[str, str], switches: dict[str, str]) -> dict[str, str]:
    """The server's environment with `server_hooks` on its path and the hooks' `switches` set."""
    path = env.get("PYTHONPATH", "")
    if str(SERVER_HOOKS) not in path.split(os.pathsep):
        path = os.pathsep.join(filter(None, (str(SERVER_HOOKS), path)))
    return env | {"PYTHONPATH": path} | switches


def sync_watch_env(env: dict[str, str], folder: Path) -> dict[str, str]:
    """The server's environment with the sync watch on (`server_hooks/sync_watch.py`) writing into `folder`."""
    return hooks_env(env, {"RING_LINEAR_SYNC_WATCH": str(folder)})


def probe_env(env: dict[str, str], folder: Path) -> dict[str, str]:
    """The server's environment with the host probe on (`server_hooks/process_probe.py`) writing into `folder`."""
    return hooks_env(env, {"RING_LINEAR_PROCESS_PROBE": str(folder)})


ROUTINGS = ("spread", "dummy", "scaled")


def routing_env(env: dict[str, str], routing: str) -> dict[str, str]:
    """`spread`: the engine's dummy fill with the routers' selection bias zeroed (`server_hooks/spread_routing.py`),
    so tokens spread over the experts as a trained model's do; `scaled`: also the routers' weights scaled to
    unit-deviation logits, so no 16-bit rounding of a score can tie them; `dummy`: the fill as the engine makes it,
    which routes every token to the same 8 or 9 experts (every vLLM run before 2026-11-30's run V, every SGLang run
    before 2026-12-01)."""
    if routing == "dummy":
        return env
    return hooks_env(env, {"RING_LINEAR_SPREAD_ROUTING": "scaled" if routing == "scaled" else "1"})


def process_lines(folder: Path, start: float, end: float, min_cpu_s: float = 1.0) -> list[str]:
    """Per server process, what a pass between wall times `start` and `end` cost on the host: CPU seconds, garbage
    collection (ms per generation), resident memory and its change (the probe's last samples before each time; a
    process started during the pass counts from its first sample)."""
    lines = []
    for path in sorted(folder.glob("*.jsonl")):
        samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        before = [s for s in samples if s["t"] <= start] or samples[:1]
        after = [s for s in samples if s["t"] <= end]
        if not before or not after or after[-1]["cpu_s"] - before[-1]["cpu_s"] < min_cpu_s:
            continue
        a, b = before[-1], after[-1]
        gc_ms = "/".join(f"{y - x:.0f}" for x, y in zip(a["gc_ms"], b["gc_ms"], strict=True))
        runs = "/".join(f"{y - x}" for x, y in zip(a["gc_collections"], b["gc_collections"], strict=True))
        lines.append(
            f"{b['cmd'][:40]} (pid {path.stem}): CPU {b['cpu_s'] - a['cpu_s']:.1f} s over {b['t'] - a['t']:.0f} s, "
            f"GC {gc_ms} ms in {runs} collections (gen 0/1/2), RSS {b['rss_mib']:.0f} MiB "
            f"({b['rss_mib'] - a['rss_mib']:+.0f})"
        )
    return lines


def token_gaps(result: dict) -> str | None:
    """The distribution of the gaps between a request's streamed tokens over one pass (the client's detailed
    result): an even slowdown moves the median, stalls (a host pause, a long prefill step) move the tail."""
    gaps = sorted(g for request in result.get("itls") or [] for g in request)
    if not gaps:
        return None
    median = gaps[len(gaps) // 2]
    stalled = sum(g for g in gaps if g > 5 * median) / sum(gaps)
    quantile = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))]  # noqa: E731
    return (
        f"token gaps (ms): median {1e3 * median:.2f}, p90 {1e3 * quantile(0.9):.2f}, p99 {1e3 * quantile(0.99):.2f}, "
        f"max {1e3 * gaps[-1]:.1f}; {stalled:.1%} of the decode time in gaps over 5x the median"
    )


def client_command(
    workload: Workload, directory: Path, tokenizer: Path, port: int, out_dir: Path, filename: str, engine: str = "vllm"
) -> list[str]:
    """The engine's own benchmark client, random token ids, fixed lengths, the same prompts every pass.

    The two clients read the same words differently: SGLang's `random` dataset samples ShareGPT text (a download,
    which the offline GPU machine cannot make; `random-ids` draws token ids as vLLM's `random` does), and its
    lengths are uniform in `[len * ratio, len]` (fixed at ratio 1), where vLLM's are `len * (1 +- ratio)` (fixed
    at 0)."""
    sglang = engine == "sglang"
    if workload.prefix_len and sglang:
        raise ValueError(f"bench_serve: the {workload.name} workload runs on vLLM only (its prefix_repetition dataset)")
    shape = [
        "--base-url", f"http://127.0.0.1:{port}", "--model", str(directory), "--tokenizer", str(tokenizer),
        "--dataset-name", "random-ids" if sglang else "random", "--random-input-len", str(workload.input_len),
        "--random-output-len", str(workload.output_len), "--random-range-ratio", "1" if sglang else "0",
        "--num-prompts", str(workload.num_prompts), "--max-concurrency", str(workload.concurrency), "--seed", "0",
        "--disable-tqdm",
    ]  # fmt: skip
    if sglang:  # ignores EOS by default; no warm-up request, or the cold pass would not be cold
        client = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang", *shape]
        return [*client, "--warmup-requests", "0", "--output-file", str(out_dir / filename)]
    if workload.prefix_len:  # the same lengths, drawn as shared prefixes + own suffixes
        shape[shape.index("random")] = "prefix_repetition"
        shape += [
            "--prefix-repetition-prefix-len", str(workload.prefix_len),
            "--prefix-repetition-suffix-len", str(workload.input_len - workload.prefix_len),
            "--prefix-repetition-num-prefixes", str(workload.num_prefixes),
            "--prefix-repetition-output-len", str(workload.output_len),
        ]  # fmt: skip
    return [
        *VLLM_CLI, "bench", "serve", "--backend", "vllm", *shape, "--ignore-eos",
        "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "99",
        "--save-result", "--result-dir", str(out_dir), "--result-filename", filename,
    ]  # fmt: skip


def client_env(engine: str, env: dict[str, str]) -> dict[str, str]:
    """The client's environment: SGLang's imports Hugging Face `datasets` at start-up (for a dataset we never ask
    for), so where it is not installed, a stub that fails on use is put on the path."""
    if engine != "sglang" or importlib.util.find_spec("datasets") is not None:
        return env
    return env | {"PYTHONPATH": os.pathsep.join(filter(None, (str(OFFLINE_STUBS), env.get("PYTHONPATH"))))}


def read_result(path: Path, workload: Workload) -> dict:
    """The client's metrics: vLLM saves one JSON object; SGLang appends a JSON line per run (the last is ours) and
    counts completed requests only."""
    text = path.read_text().strip()
    try:
        result = json.loads(text)
    except json.JSONDecodeError:  # several JSON lines
        result = json.loads(text.splitlines()[-1])
    result.setdefault("failed", workload.num_prompts - result.get("completed", workload.num_prompts))
    return result


def answers(port: int) -> bool:
    """Whether a server already answers `/health` on this port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def rejection(port: int, model: str, workload: Workload) -> str:
    """The server's own words for a request of this workload's size (the client reports only 'Bad Request')."""
    body = json.dumps(
        {"model": model, "prompt": " ".join(f"t{i % 1000 + 1}" for i in range(workload.input_len)),
         "max_tokens": workload.output_len, "ignore_eos": True}
    ).encode()  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            return f"a request of this size succeeds alone (HTTP {reply.status})"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}: {error.read().decode(errors='replace')[:500]}"


# vLLM's Prometheus counters read around each pass: what the pass did on the server side
SERVER_COUNTERS = {
    "cache_hits": "vllm:prefix_cache_hits_total",  # prompt tokens served from the prefix cache
    "cache_queries": "vllm:prefix_cache_queries_total",  # prompt tokens looked up
    "steps": "vllm:iteration_tokens_total_count",  # engine steps
    "step_tokens": "vllm:iteration_tokens_total_sum",  # tokens those steps ran
    "preemptions": "vllm:num_preemptions_total",
}


def server_counters(port: int) -> dict[str, float] | None:
    """vLLM's `SERVER_COUNTERS` so far (its `/metrics`); None where not served. A request whose blocks could not be
    allocated yet is looked up again at the next step and counted again, so under memory pressure the hit rate
    reads a little high."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return counter_totals(text)


def counter_totals(metrics_text: str) -> dict[str, float] | None:
    """Each of `SERVER_COUNTERS` that the Prometheus text page has, summed over its label sets; None if none."""
    names = {metric: key for key, metric in SERVER_COUNTERS.items()}
    totals: dict[str, float] = {}
    for line in metrics_text.splitlines():
        key = names.get(line.split("{", 1)[0].split(" ", 1)[0])
        if key is not None:
            totals[key] = totals.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals or None


def pass_counters(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """What one pass added to each counter both readings have."""
    if before is None or after is None:
        return {}
    return {key: after[key] - before[key] for key in after if key in before}


def describe_counters(done: dict[str, float]) -> list[str]:
    """The lines a pass's counters print: the hit rate where prompts were looked up, the engine steps it took."""
    lines = []
    if done.get("cache_queries", 0) > 0:
        lines.append(f"prefix-cache hit rate: {done['cache_hits'] / done['cache_queries']:.1%} of prompt tokens")
    if done.get("steps", 0) > 0:
        lines.append(
            f"engine steps: {done['steps']:.0f}, {done.get('step_tokens', 0) / done['steps']:.0f} tokens a step, "
            f"{done.get('preemptions', 0):.0f} preemptions"
        )
    return lines


def wait_ready(port: int, server: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until `/health` answers 200; raises if the server exits or the time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it was ready")
        if answers(port):
            return time.monotonic() - start
        time.sleep(2)
    raise TimeoutError(f"the server was not ready after {timeout_s:.0f} s")


JIT_LINE = re.compile(r"JIT compilation during inference: (\S+)")
# what the server said about its memory: weights, the KV/state pool and how many requests of the longest length fit
MEMORY_LINE = re.compile(
    r"(Model loading took .*|GPU KV cache size: .*|Maximum concurrency for .*|KV Cache is allocated.*|"
    r"Mamba Cache is allocated.*)"
)


def stop_server(server: subprocess.Popen) -> None:
    """SIGINT to the server's process group, SIGKILL after 60 s; a server that already died (it failed to start, and
    `wait_ready` says why) is left alone rather than hiding that error behind a `ProcessLookupError`."""
    try:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(60)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()  # reaped: the caller sees it gone, not a zombie that still polls as running


def memory_lines(log_text: str) -> list[str]:
    """The server log's lines on weight memory, pool size and the concurrency that fits (vLLM and SGLang)."""
    return [match.strip() for match in MEMORY_LINE.findall(log_text)]


def live_compiles(log_text: str) -> list[str]:
    """Kernels vLLM's JIT monitor saw compile while serving (its 'during inference' warnings)."""
    return JIT_LINE.findall(log_text)


def log_size(path: Path) -> int:
    """Where the server's log ends now: a pass's own lines are those written between two of these."""
    return path.stat().st_size if path.exists() else 0


def compiles_between(path: Path, start: int, end: int) -> list[str]:
    """The live compiles the server logged between two `log_size` marks (one pass: a compile stalls every request
    in flight for its duration, so a pass that holds one is not a like-for-like figure)."""
    with open(path, "rb") as log:
        log.seek(start)
        return live_compiles(log.read(max(end - start, 0)).decode(errors="replace"))


class GpuMemorySampler:
    """GPU memory in use (nvidia-smi, every `period_s`) while a client runs: a leak shows as growth after the
    server's pools are allocated. Samples nothing where nvidia-smi is absent."""

    def __init__(self, period_s: float = 5.0) -> None:
        self.period_s, self.samples = period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> GpuMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                reply = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10, check=True,
                )  # fmt: skip
                self.samples.append(sum(int(line) for line in reply.stdout.split()))
            except (OSError, subprocess.SubprocessError, ValueError):
                return
            self._stop.wait(self.period_s)

    def describe(self) -> str:
        quarter = max(1, len(self.samples) // 4)
        first, last = self.samples[:quarter], self.samples[-quarter:]
        growth = sum(last) / len(last) - sum(first) / len(first)
        return f"min {min(self.samples)}, max {max(self.samples)}, last quarter - first quarter {growth:+.0f}"


def label(model: str, engine: str, suffix: str = "") -> str:
    """How a (model, variant, engine) run is named in files and tables: vLLM's keep the bare model name."""
    return model + suffix if engine == "vllm" else f"{model}{suffix}.{engine}"


def run(args: argparse.Namespace) -> None:
    if answers(args.port):
        raise SystemExit(f"bench_serve: a server already answers on port {args.port}; stop it or pass --port")
    if args.py_spy and not (os.path.isfile(args.py_spy) and os.access(args.py_spy, os.X_OK)):
        raise SystemExit(f"bench_serve: --py-spy {args.py_spy} is not an executable file: give py-spy's path")
    if args.unstacked_states and (args.engine != "vllm" or not args.model.startswith("ring-linear")):
        raise SystemExit(
            f"bench_serve: --unstacked-states is ring-linear's vLLM cache layout; --model {args.model} --engine "
            f"{args.engine} has none: pick a ring-linear model on vLLM"
        )
    if args.fp32_router and not args.model.startswith("ring-linear"):
        raise SystemExit(f"bench_serve: --fp32-router is ring-linear's router GEMM; --model {args.model} has none")
    if args.torch_profile and args.engine != "vllm":
        raise SystemExit("bench_serve: --torch-profile reads vLLM's profiler traces: serve with --engine vllm")
    if args.prefix_match_unit is not None and (args.engine != "vllm" or not args.model.endswith("-cached")):
        raise SystemExit(
            f"bench_serve: --prefix-match-unit is vLLM's prefix-caching flag; --model {args.model} --engine "
            f"{args.engine} serves without it: pick a -cached model on vLLM"
        )
    # a time limit's SIGTERM must still stop the server (it runs in its own session, so it would outlive us)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    routing = args.routing
    name_of_run = label(
        args.model,
        args.engine,
        variant(
            args.size,
            args.layers,
            args.quantization,
            routing,
            args.prefix_match_unit,
            args.unstacked_states,
            args.fp32_router,
        ),
    )
    config = model_config(args.size, args.layers)
    workloads = [WORKLOADS[name] for name in args.workloads]
    max_len = max(w.input_len + w.output_len for w in workloads)
    directory = write_model_dir(args.model, out / f"model-{name_of_run}", args.engine, config, max_len)
    tokenizer = write_word_tokenizer(json.loads(RELEASED_CONFIG.read_text())["vocab_size"], out / "tokenizer")
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    log_path = out / f"server-{name_of_run}.log"
    probe = out / f"probe-{name_of_run}"
    server_environment = routing_env(server_env(args.model, env, args.unstacked_states, args.fp32_router), routing)
    if args.probe:
        server_environment = probe_env(server_environment, probe)
    watch, profile_dir = out / f"sync-{name_of_run}", out / f"profile-{name_of_run}"
    if args.sync_watch:
        server_environment = sync_watch_env(server_environment, watch)
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            serve_command(
                args.model, directory, tokenizer, args.port, max_len, args.engine, args.quantization,
                args.prefix_match_unit, profile_dir if args.torch_profile else None,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_environment, start_new_session=True, preexec_fn=host_profile.default_sigint,  # stop_server
        )  # fmt: skip
        summary = {"model": name_of_run, "workloads": [w.name for w in workloads], "routing": routing}
        try:
            summary["startup_s"] = round(wait_ready(args.port, server, args.startup_timeout), 1)
            print(f"{name_of_run}: ready in {summary['startup_s']} s", flush=True)
            if args.sync_watch:  # start-up's own waits are not counted
                watch.mkdir(parents=True, exist_ok=True)
                (watch / "on").touch()
            for pass_name in args.passes:
                for w in workloads:
                    if pass_name != "cold" and not w.warm_pass:
                        continue
                    name = f"{name_of_run}__{w.name}__{pass_name}.json"
                    started = time.monotonic()
                    client = client_command(w, directory, tokenizer, args.port, out, name, args.engine)
                    if args.detailed:
                        client.append("--output-details" if args.engine == "sglang" else "--save-detailed")
                    profiled = args.torch_profile and pass_name == args.passes[-1]
                    if profiled:
                        client.append("--profile")
                    wall_start, log_start = time.time(), log_size(log_path)
                    before = server_counters(args.port)
                    with GpuMemorySampler() as memory, host_recordings(args, out, name) as recordings:
                        subprocess.run(client, check=True, env=client_env(args.engine, env))
                    wall_end = time.time()
                    result = read_result(out / name, w)
                    done = pass_counters(before, server_counters(args.port))
                    summary.setdefault("server_counters", {})[f"{w.name}/{pass_name}"] = done
                    for line in describe_counters(done):
                        print(f"  {line}", flush=True)
                    summary.setdefault("gpu_memory_mib", {})[f"{w.name}/{pass_name}"] = memory.samples
                    print(
                        f"{name_of_run} {w.name} {pass_name}: {result['output_throughput']:.0f} out tok/s, "
                        f"TTFT mean/p99 {result['mean_ttft_ms']:.0f}/{result['p99_ttft_ms']:.0f} ms, "
                        f"TPOT mean/p99 {result['mean_tpot_ms']:.1f}/{result['p99_tpot_ms']:.1f} ms, "
                        f"failed {result.get('failed', 0)} ({time.monotonic() - started:.0f} s)",
                        flush=True,
                    )
                    if memory.samples:
                        print(f"  GPU memory used (MiB): {memory.describe()}", flush=True)
                    gaps = token_gaps(result)
                    if gaps:
                        print(f"  {gaps}", flush=True)
                    if args.engine == "vllm":  # SGLang has no JIT monitor
                        compiled = compiles_between(log_path, log_start, log_size(log_path))
                        summary.setdefault("live_compiles_by_pass", {})[f"{w.name}/{pass_name}"] = compiled
                        if compiled:
                            print(
                                f"  compiled during this pass (its figures include the stall): {compiled}", flush=True
                            )
                    for recording in recordings:
                        for line in recording.describe():
                            print(f"  py-spy: {line}", flush=True)
                    if profiled:
                        for trace in sorted(profile_dir.glob("*.pt.trace.json*")):
                            for line in served_timeline.describe(trace):
                                print(f"  timeline: {line}", flush=True)
                    if args.sync_watch or args.probe:  # the hooks' samples past the pass's end are written
                        time.sleep(2 * max(sync_watch.PERIOD_S, process_probe.PERIOD_S))
                    if args.sync_watch:
                        for line in sync_watch.describe(str(watch)) or ["no call waited for the GPU"]:
                            print(f"  host waits on the GPU, so far: {line}", flush=True)
                    if args.probe:
                        for line in process_lines(probe, wall_start, wall_end):
                            print(f"  host: {line}", flush=True)
                    if result.get("failed"):
                        print(f"  why requests failed: {rejection(args.port, str(directory), w)}", flush=True)
        finally:
            stop_server(server)
    summary["memory_lines"] = memory_lines(log_path.read_text(errors="replace"))
    if args.engine == "vllm":  # SGLang has no JIT monitor: there, compare the cold pass with the warm one
        summary["live_compiles"] = live_compiles(log_path.read_text(errors="replace"))
        print(f"{name_of_run}: kernels compiled during inference: {summary['live_compiles'] or 'none'}")
    (out / f"summary-{name_of_run}.json").write_text(json.dumps(summary, indent=1))


@contextlib.contextmanager
def host_recordings(args: argparse.Namespace, out: Path, name: str) -> Iterator[list[host_profile.PySpyRecording]]:
    """py-spy recordings of the engine's scheduler processes over one pass (`--py-spy`), else none."""
    if not args.py_spy:
        yield []
        return
    pids = host_profile.find_processes(host_profile.ENGINE_CORE_TITLES[args.engine])
    if not pids:
        print(f"  py-spy: no {host_profile.ENGINE_CORE_TITLES[args.engine]} process found: not recorded", flush=True)
    stem = name.removesuffix(".json")
    recordings = [host_profile.PySpyRecording(args.py_spy, pid, out / f"py-spy-{stem}-{pid}.txt") for pid in pids]
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(recording) for recording in recordings]


def load_results(out: Path) -> dict[tuple[str, str, str], dict]:
    """(model, workload, pass) -> the client's JSON."""
    results = {}
    for path in sorted(out.glob("*__*__*.json")):
        model, workload, pass_name = path.stem.split("__")
        results[(model, workload, pass_name)] = read_result(path, WORKLOADS[workload])
    return results


def ratio(metric: str, ours: float, theirs: float) -> float:
    """How many times better ours is (throughput: ours/theirs; latency: theirs/ours)."""
    if metric in HIGHER_IS_BETTER:
        return ours / theirs
    return theirs / ours


def load_live_compiles(out: Path) -> dict[tuple[str, str, str], list[str]]:
    """(model, workload, pass) -> the kernels its server compiled during that pass (runs that recorded it)."""
    found = {}
    for path in sorted(out.glob("summary-*.json")):
        summary = json.loads(path.read_text())
        for key, kernels in summary.get("live_compiles_by_pass", {}).items():
            workload, pass_name = key.split("/")
            found[(summary["model"], workload, pass_name)] = kernels
    return found


def report_table(
    results: dict,
    baseline: str = "softmax-twin",
    model: str = "ring-linear",
    compiles: dict[tuple[str, str, str], list[str]] | None = None,
) -> str:
    """Markdown: each (workload, pass) with both runs' metrics and `model`'s advantage (x, >1 = better). A pass in
    which either server compiled a kernel (`compiles`, from `load_live_compiles`) has its ratios marked with who
    stalled: they compare a compile as much as the models."""
    compiles = compiles or {}
    header = f"| workload | pass | metric | {model} | {baseline} | {model} advantage |"
    lines = [header, "|---|---|---|---:|---:|---:|"]
    for workload in WORKLOADS:
        for pass_name in PASSES:
            ours, theirs = results.get((model, workload, pass_name)), results.get((baseline, workload, pass_name))
            if ours is None or theirs is None:
                continue
            runs = ((model, ours), (baseline, theirs))
            failed = [f"{name}: {run['failed']} failed" for name, run in runs if run.get("failed")]
            stalled = [name for name, _ in runs if compiles.get((name, workload, pass_name))]
            for metric in METRICS:
                # a run that lost requests did less work: its figures are shown, but no ratio
                advantage = f"{ratio(metric, ours[metric], theirs[metric]):.2f}x"
                if stalled:
                    advantage += " (compiled live: " + ", ".join(stalled) + ")"
                advantage = "none (" + ", ".join(failed) + ")" if failed else advantage
                lines.append(
                    f"| {workload} | {pass_name} | {metric} | {ours[metric]:,.1f} | {theirs[metric]:,.1f} "
                    f"| {advantage} |"
                )
    cached_twin = baseline + "-cached"
    cached = [
        f"| {w} | {results[(cached_twin, w, 'warm')]['output_throughput']:,.0f} |"
        for w in WORKLOADS
        if (cached_twin, w, "warm") in results
    ]
    if cached:
        lines += ["", "| workload | twin with prefix caching, warm (cache hits): output tok/s |", "|---|---:|"]
        lines += cached
    return "\n".join(lines)


PREVIOUS_DEFAULTS = ("-unstacked", "-fp32-router")  # the label suffixes of a plugin default turned back


def pairs(labels: set[str]) -> list[tuple[str, str]]:
    """(model, baseline) pairs among the runs: every ring-linear run against the twin of the same variant and
    engine, each SGLang run against the same run on vLLM, each aligned run against the default one, and the
    plugin's defaults against the same run with one of them turned back (unstacked, fp32 router), which also meets
    the twin."""
    found = []
    for model, baseline in (("ring-linear-aligned", "ring-linear"), ("ring-linear", "softmax-twin")):
        for name in sorted(labels):
            if name.startswith(model) and baseline + name[len(model) :] in labels:
                found.append((name, baseline + name[len(model) :]))
    for previous in PREVIOUS_DEFAULTS:  # a default turned back: the default run against it, it against the twin
        for name in sorted(labels):
            plain = name.replace(previous, "")
            if name.startswith("ring-linear") and plain != name:
                twin = "softmax-twin" + plain[len("ring-linear") :]
                found += [pair for pair in ((plain, name), (name, twin)) if pair[0] in labels and pair[1] in labels]
    for name in sorted(labels):
        if name.startswith("ring-linear") and name.endswith(".sglang") and name.removesuffix(".sglang") in labels:
            found.append((name, name.removesuffix(".sglang")))
    return found


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results, compiles = load_results(out), load_live_compiles(out)
    for model, baseline in pairs({key[0] for key in results}):
        print(f"\n### {model} vs {baseline}\n")
        print(report_table(results, baseline, model, compiles))
    for path in sorted(out.glob("summary-*.json")):
        summary = json.loads(path.read_text())
        whole_run = summary.get("live_compiles", "not monitored")
        print(
            f"\n{summary['model']}: ready in {summary.get('startup_s')} s; routing {summary.get('routing', 'dummy')}; "
            f"kernels compiled during inference: {whole_run or 'none'}"
        )
        for line in summary.get("memory_lines", []):
            print(f"  {line}")


def parser() -> argparse.ArgumentParser:
    """The command line: `run` (one model's server and workloads) and `report`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start one model's server and run the workloads against it")
    run_parser.add_argument("--model", choices=MODELS, required=True)
    run_parser.add_argument(
        "--engine", choices=ENGINES, default="vllm", help="the engine serving and benchmarking the model"
    )
    run_parser.add_argument(
        "--passes", nargs="+", choices=PASSES, default=["cold", "warm"], help="cold alone where time is short"
    )
    run_parser.add_argument(
        "--probe", action="store_true", help="sample each server process's CPU, GC and memory per pass"
    )
    run_parser.add_argument(
        "--detailed", action="store_true", help="the client saves every token's time: print their distribution"
    )
    run_parser.add_argument(
        "--unstacked-states",
        action="store_true",
        help=f"serve ring-linear with {STACKED_STATES_SWITCH}=0 (one linear state a cache entry, as before run AH)",
    )
    run_parser.add_argument(
        "--fp32-router",
        action="store_true",
        help=f"serve ring-linear with {ROUTER_PRODUCTS_SWITCH}=fp32 (the router's fp32 GEMM, as before run AI)",
    )
    run_parser.add_argument(
        "--torch-profile",
        action="store_true",
        help=f"vLLM's torch profiler over {PROFILE_STEPS} steps of the last pass: GPU busy against host time per step",
    )
    run_parser.add_argument(
        "--sync-watch",
        action="store_true",
        help="count the server's calls that wait for the GPU (torch's sync debug mode) from ready on, by stack",
    )
    run_parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="record the engine core with this py-spy binary during each pass and print where its host time goes",
    )
    run_parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(SPEED_WORKLOADS))
    run_parser.add_argument("--size", choices=SIZES, default="mini", help="Ring-mini or Ring-flash shapes")
    run_parser.add_argument("--layers", type=int, help="serve this many layers (a multiple of the layer group)")
    run_parser.add_argument("--quantization", choices=["fp8"], help="the engine's online quantization")
    run_parser.add_argument(
        "--prefix-match-unit",
        type=int,
        metavar="TOKENS",
        help="vLLM's --prefix-match-unit for a -cached model: cache hits at this granularity inside a block",
    )
    run_parser.add_argument(
        "--routing",
        choices=ROUTINGS,
        default="spread",
        help="spread (default): zero the dummy routers' bias so tokens spread over the experts; dummy: the engine's "
        "fill as is (every token on the same experts)",
    )
    run_parser.add_argument("--out", default="serve-results")
    run_parser.add_argument("--port", type=int, default=8765)
    run_parser.add_argument("--startup-timeout", type=float, default=900)
    report_parser = sub.add_parser("report", help="the ratio table of the results in a folder")
    report_parser.add_argument("out")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    (run if args.command == "run" else report)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
