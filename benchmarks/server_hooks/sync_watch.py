"""Which host calls wait for the GPU in a served engine, started by `sitecustomize` under `bench_serve run
--sync-watch`.

vLLM's asynchronous scheduling prepares step N+1 on the host while the GPU runs step N; one call that waits for the
GPU (a `.item()`, a `.tolist()` of a device tensor, a blocking device-to-host copy) puts the host's work back in
series with the GPU's. Where `RING_LINEAR_SYNC_WATCH` names a folder, each process that has initialised CUDA turns on
torch's sync debug mode once `<folder>/on` exists (bench_serve creates it when the server is ready, so start-up's
own waits are not counted) and counts each synchronising call by its Python stack, rewriting `<folder>/<pid>.json`
(stack -> count) every second.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
import warnings
from collections import Counter

FOLDER = os.environ.get("RING_LINEAR_SYNC_WATCH")
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's words under set_sync_debug_mode("warn")
PERIOD_S = 1.0
STACK_DEPTH = 8  # innermost frames kept per stack: enough to name the caller inside vLLM or ours

_OWN_FILES = (__file__, warnings.__file__)  # the frames that report a call, not the ones that made it
_counts: Counter = Counter()
_lock = threading.Lock()


def stack_key(frames: list[traceback.FrameSummary], depth: int = STACK_DEPTH) -> str:
    """The innermost `depth` frames, outermost first, as `file:line function` joined by ' < ' from the inside out."""
    inner = [f for f in frames if f.filename not in _OWN_FILES][-depth:]
    return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(inner))


def _record(message, category, filename, lineno, file=None, line=None, _show=warnings.showwarning) -> None:
    if SYNC_WARNING not in str(message):
        _show(message, category, filename, lineno, file, line)
        return
    key = stack_key(traceback.extract_stack())
    with _lock:
        _counts[key] += 1


def _turn_on() -> bool:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")  # every call, not once per location
    warnings.showwarning = _record
    torch.cuda.set_sync_debug_mode("warn")
    return True


def _watch() -> None:
    path, on = os.path.join(FOLDER, f"{os.getpid()}.json"), os.path.join(FOLDER, "on")
    while not (os.path.exists(on) and _turn_on()):
        time.sleep(PERIOD_S)
    while True:
        time.sleep(PERIOD_S)
        with _lock:
            snapshot = dict(_counts.most_common())
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(snapshot, f, indent=0)
            os.replace(path + ".tmp", path)
        except OSError:
            return


def _start() -> None:
    threading.Thread(target=_watch, name="ring-linear-sync-watch", daemon=True).start()


def describe(folder: str, top: int = 8) -> list[str]:
    """Per process that recorded any, its synchronising calls so far, most frequent first."""
    lines = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name)) as f:
            counts = json.load(f)
        if counts:
            lines.append(f"pid {name.removesuffix('.json')}: {sum(counts.values())} synchronising calls")
            lines += [f"  {n:7d}  {stack}" for stack, n in list(counts.items())[:top]]
    return lines


if FOLDER:
    os.makedirs(FOLDER, exist_ok=True)
    _start()
    os.register_at_fork(after_in_child=_start)
