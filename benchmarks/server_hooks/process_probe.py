"""A host-side probe for every Python process of a served engine (API server, engine core, workers), started by
`sitecustomize` under `bench_serve run --probe`: where `RING_LINEAR_PROCESS_PROBE` names a folder, each process
appends a JSON line every 2 s to `<folder>/<pid>.jsonl` with its resident memory, CPU time and the time Python's
garbage collector spent per generation. A served pass that slows down without its GPU work changing (RESULTS.md,
runs K and M) shows here as host time: more CPU per step, longer collections, or growing memory."""

import gc
import json
import os
import threading
import time

FOLDER = os.environ.get("RING_LINEAR_PROCESS_PROBE")
PERIOD_S = 2.0
_gc_ms = [0.0, 0.0, 0.0]
_gc_started = [0]


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter_ns()
    elif _gc_started[0]:
        _gc_ms[info.get("generation", 2)] += (time.perf_counter_ns() - _gc_started[0]) / 1e6


def _command() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:  # after setproctitle: vLLM names its processes
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def _sample() -> dict:
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {
        "t": time.time(),
        "cmd": _command(),
        "rss_mib": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20,
        "cpu_s": time.process_time(),
        "gc_ms": list(_gc_ms),
        "gc_collections": [s["collections"] for s in gc.get_stats()],
        "gc_frozen": gc.get_freeze_count(),
    }


def _write_forever() -> None:
    path = os.path.join(FOLDER, f"{os.getpid()}.jsonl")
    while True:
        try:
            with open(path, "a") as f:
                f.write(json.dumps(_sample()) + "\n")
        except OSError:
            return
        time.sleep(PERIOD_S)


def _start() -> None:
    threading.Thread(target=_write_forever, name="ring-linear-process-probe", daemon=True).start()


if FOLDER:
    os.makedirs(FOLDER, exist_ok=True)
    gc.callbacks.append(_on_gc)
    _start()
    os.register_at_fork(after_in_child=_start)  # a forked engine core gets its own writer
