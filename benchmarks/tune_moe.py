"""Tune vLLM's fused MoE kernel (bf16) for Ring-linear's expert shapes on this GPU, and write the configuration file
vLLM reads from `VLLM_TUNED_CONFIG_FOLDER`.

    python -m benchmarks.tune_moe --out /tmp/moe-configs [--size mini] [--batch-sizes 1 64 8192]

vLLM ships no bf16 file for 256 experts of width 512 on an H200, so both Ring-mini-linear and its softmax twin run
`get_default_config`'s heuristic. For each batch size (vLLM picks the file's nearest one at run time) every candidate
below is timed on the same inputs (`do_bench_cudagraph`: device time; routing uniform over the experts), its output
checked against the default configuration's, and the fastest kept. The table shows what each batch size gains in
isolation; only a served run can show what a file buys (RESULTS.md records the one made). Every distinct config
compiles on first use, and vLLM's start-up runs only its CUDA-graph sizes (up to 512 tokens by default) and one
profile batch, so a file with several configs above 512 tokens compiles the others on live traffic: the tool warns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import triton

from benchmarks.bench_aligned_moe import RING_MINI, inputs
from common_kernels.testing import rel_rms_error

SHAPES = {  # per rank at TP 1: experts, top-k, hidden, expert width
    "mini": RING_MINI,
    "flash": {"experts": 256, "top_k": 8, "hidden": 4096, "intermediate": 1024},
}
# vLLM's own tuning grid (benchmarks/kernels/benchmark_moe.py): the file's keys
BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192, 16384)
KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
# Hopper-sized tiles tried at every batch size beside vLLM's defaults and any file vLLM has for the shape on another
# GPU: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
EXTRA_TILES = (
    (16, 64, 128, 1, 4, 3), (16, 128, 128, 1, 4, 3), (16, 64, 256, 1, 4, 3), (16, 128, 64, 1, 4, 4),
    (32, 64, 128, 1, 4, 3), (32, 128, 64, 1, 4, 4), (64, 64, 64, 1, 4, 4), (64, 128, 128, 1, 8, 3),
    (64, 128, 64, 1, 4, 4), (64, 256, 64, 1, 8, 3), (128, 128, 64, 1, 8, 3), (128, 128, 64, 16, 8, 4),
    (128, 256, 64, 1, 8, 3), (128, 256, 64, 16, 8, 4), (128, 128, 128, 1, 8, 3), (256, 128, 64, 16, 8, 3),
)  # fmt: skip
MAX_ERROR = 2e-2  # a candidate's output against the default's, relative RMS: bf16 rounding differs, wrong tiles do not


def as_config(tiles: Iterable[int]) -> dict[str, int]:
    return dict(zip(KEYS, tiles, strict=True))


def tiles_of(config: dict) -> tuple[int, ...]:
    return tuple(int(config[key]) for key in KEYS)


def candidates(defaults: Iterable[dict], known: dict[int, dict] | None) -> list[dict[str, int]]:
    """The configurations to time, each once: vLLM's defaults (one per batch size), another GPU's tuned file for the
    shape (`known`), then `EXTRA_TILES`."""
    pool = [tiles_of(c) for c in defaults] + [tiles_of(c) for c in (known or {}).values()] + list(EXTRA_TILES)
    return [as_config(t) for t in dict.fromkeys(pool)]


def nearest_key(configs: dict[int, dict], batch: int) -> int:
    """The batch size whose entry vLLM uses for `batch` (`try_get_optimal_moe_config`: the nearest key)."""
    return min(configs, key=lambda key: abs(key - batch))


def write_configs(folder: Path, name: str, best: dict[int, dict[str, int]]) -> Path:
    """Write `best` as vLLM's JSON (batch size -> config, plus the Triton version it was tuned with) in one step: a
    reader sees the old file or the new one, never half of it."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"triton_version": triton.__version__, **{str(m): best[m] for m in sorted(best)}}
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        json.dump(payload, f, indent=4)
        f.write("\n")
    path = folder / name
    os.replace(temporary, path)
    return path


def compiled_on_live_traffic(best: dict[int, dict], largest_graph: int = 512) -> list[int]:
    """The batch sizes above `largest_graph` whose config differs from the largest batch size's (the one vLLM's
    profile run compiles at start-up): their kernels compile while serving."""
    above = [m for m in sorted(best) if m > largest_graph]
    return [m for m in above if tiles_of(best[m]) != tiles_of(best[above[-1]])] if above else []


def plausible(config: dict, batch: int, shape: dict[str, int]) -> bool:
    """Whether a config's token tile suits the batch: no taller than twice an expert's rows (a decode step's experts
    see a token or two) and, once experts see 64 rows or more, at least 32 tall. Keeps the compiles to what can win."""
    rows = batch * shape["top_k"] / shape["experts"]
    tile = config["BLOCK_SIZE_M"]
    return tile <= max(32, 2 * rows) and (rows < 64 or tile >= 32)


def tune_batch(
    batch: int, pool: list[dict], default: dict, call: Callable[[dict | None], torch.Tensor]
) -> tuple[float, float, dict]:
    """(vLLM's ms, the best ms, the best config) at one batch size; `call(None)` runs vLLM's own choice (`default`),
    which stays the answer unless a candidate beats it. A candidate whose output is not the default's up to bf16
    rounding is reported and dropped."""
    reference = call(None)
    default_ms = triton.testing.do_bench_cudagraph(lambda: call(None), return_mode="median")
    best_ms, best = default_ms, default
    for config in pool:
        try:
            error = rel_rms_error(reference, call(config))
            ms = triton.testing.do_bench_cudagraph(lambda config=config: call(config), return_mode="median")
        except (triton.runtime.errors.OutOfResources, RuntimeError) as failure:  # too much shared memory, mostly
            print(f"  batch {batch}: {tiles_of(config)} skipped ({type(failure).__name__})")
            continue
        if error > MAX_ERROR:
            print(f"  batch {batch}: {tiles_of(config)} dropped: output {error:.3g} rel RMS from the default's")
            continue
        if ms < best_ms:
            best_ms, best = ms, config
    return default_ms, best_ms, best


def other_gpu_file(folder: Path, name: str) -> dict[int, dict] | None:
    """vLLM's tuned file for the same shape on an H100 (the nearest GPU it has one for), as candidates."""
    path = folder / re.sub(r"device_name=[^,.]+", "device_name=NVIDIA_H100_80GB_HBM3", name)
    if not path.exists():
        return None
    return {int(m): c for m, c in json.loads(path.read_text()).items() if m != "triton_version"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON (vLLM's file name)")
    parser.add_argument("--size", choices=sorted(SHAPES), default="mini")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    args = parser.parse_args(argv)

    os.environ.pop("VLLM_TUNED_CONFIG_FOLDER", None)  # "vLLM's own" below is vLLM's file or heuristic, not ours
    from vllm.model_executor.layers.fused_moe import fused_experts, override_config
    from vllm.model_executor.layers.fused_moe import fused_moe as vllm_moe

    shape = SHAPES[args.size]
    E, k, D, width = (shape[key] for key in ("experts", "top_k", "hidden", "intermediate"))
    name = vllm_moe.get_config_file_name(E, width, None)
    shipped = vllm_moe.get_moe_configs(E, width, None)  # vLLM's own file for this GPU, if it has one
    known = other_gpu_file(Path(vllm_moe.__file__).parent / "configs", name)
    print(f"# {name}: vLLM's own choice is {'its file' if shipped else 'get_default_config (no file)'}")
    print("| batch | vLLM's own ms | best ms | speed-up | best (BLOCK_M, N, K, GROUP_M, warps, stages) |")
    print("|---:|---:|---:|---:|---|")
    generator = torch.Generator().manual_seed(0)
    best: dict[int, dict[str, int]] = {}
    for batch in args.batch_sizes:
        t = inputs(batch, generator, shape)
        t["ids"] = t["ids"].to(torch.int32)  # what vLLM's router hands its experts
        own = (
            shipped[nearest_key(shipped, batch)]
            if shipped
            else vllm_moe.get_default_config(batch, E, width, D, k, None)
        )
        pool = [c for c in candidates([own], known) if plausible(c, batch, shape)]

        def call(config: dict | None, t=t) -> torch.Tensor:
            if config is None:
                return fused_experts(t["x"], t["w13"], t["w2"], t["weights"], t["ids"])
            with override_config(config):
                return fused_experts(t["x"], t["w13"], t["w2"], t["weights"], t["ids"])

        default_ms, best_ms, config = tune_batch(batch, pool, {key: own[key] for key in KEYS if key in own}, call)
        best[batch] = config
        print(f"| {batch} | {default_ms:.4f} | {best_ms:.4f} | {default_ms / best_ms:.2f}x | {tiles_of(config)} |")
        path = write_configs(args.out, name, best)  # after every batch size: a run cut short keeps what it found
    print(f"wrote {path} ({len(best)} of {len(args.batch_sizes)} batch sizes)")
    if late := compiled_on_live_traffic(best):
        print(
            f"warning: the configs for batch sizes {late} are not the largest one's: vLLM's start-up does not "
            "compile them"
        )


if __name__ == "__main__":
    main()
