import json

from benchmarks.tune_moe import (
    EXTRA_TILES,
    KEYS,
    SHAPES,
    as_config,
    candidates,
    compiled_on_live_traffic,
    nearest_key,
    other_gpu_file,
    plausible,
    tiles_of,
    write_configs,
)


def test_candidates_time_each_config_once_defaults_first():
    default = as_config((16, 64, 128, 1, 4, 4))
    known = {1: as_config(EXTRA_TILES[0]), 2: as_config((16, 32, 64, 1, 4, 4))}
    pool = candidates([default, default], known)
    tiles = [tiles_of(c) for c in pool]
    assert tiles[0] == (16, 64, 128, 1, 4, 4) and tiles[1] == EXTRA_TILES[0] and tiles[2] == (16, 32, 64, 1, 4, 4)
    assert len(tiles) == len(set(tiles)) == 2 + len(EXTRA_TILES)  # the H100 entry already among the extras
    assert all(set(c) == set(KEYS) for c in pool)


def test_token_tiles_fit_the_rows_an_expert_sees():
    mini = SHAPES["mini"]
    tall, short = as_config((128, 128, 64, 1, 8, 3)), as_config((16, 64, 128, 1, 4, 3))
    assert plausible(short, 64, mini) and not plausible(tall, 64, mini)  # a decode step: 2 rows an expert
    assert plausible(tall, 16384, mini) and not plausible(short, 16384, mini)  # a prefill chunk: 512 rows
    assert plausible(as_config((32, 64, 128, 1, 4, 3)), 1, mini)


def test_vllm_takes_the_nearest_batch_size():
    configs = {1: "a", 64: "b", 4096: "c"}
    assert [nearest_key(configs, m) for m in (1, 30, 40, 2000, 3000, 100000)] == [1, 1, 64, 64, 4096, 4096]


def test_the_file_is_vllms_format_written_in_one_step(tmp_path):
    best = {64: as_config((16, 64, 128, 1, 4, 3)), 8: as_config((16, 32, 64, 1, 4, 4))}
    path = write_configs(tmp_path / "configs", "E=256,N=512,device_name=NVIDIA_H200.json", best)
    data = json.loads(path.read_text())
    assert list(data)[1:] == ["8", "64"] and data["64"] == best[64] and "triton_version" in data
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it
    write_configs(path.parent, path.name, {1: best[8]})
    assert list(json.loads(path.read_text()))[1:] == ["1"]


def test_another_gpus_file_seeds_the_candidates(tmp_path):
    name = "E=256,N=512,device_name=NVIDIA_H200.json"
    assert other_gpu_file(tmp_path, name) is None
    h100 = {"triton_version": "3.1.0", "16": as_config((16, 64, 64, 64, 4, 5))}
    (tmp_path / name.replace("NVIDIA_H200", "NVIDIA_H100_80GB_HBM3")).write_text(json.dumps(h100))
    assert other_gpu_file(tmp_path, name) == {16: h100["16"]}


def test_configs_above_the_graph_sizes_other_than_the_largest_ones_are_compiled_live():
    small, mid, large = as_config((16, 64, 128, 1, 4, 3)), as_config((64, 128, 64, 1, 4, 3)), as_config(EXTRA_TILES[-3])
    assert compiled_on_live_traffic({64: small, 1024: mid, 1536: mid, 8192: large, 16384: large}) == [1024, 1536]
    assert compiled_on_live_traffic({64: small, 512: mid, 8192: large}) == []
    assert compiled_on_live_traffic({64: small}) == []
