"""`bench_aligned_attention` runs both of our decode paths on one cache and compares their bits: its rows at a tiny
size on the CPU interpreter (the timings themselves, and FlashAttention's row, need a GPU)."""

import pytest
import triton.testing

from benchmarks import bench_aligned_attention as bench
from common_kernels.ops.attention import aligned


@pytest.fixture
def tiny_bench(monkeypatch):
    """The bench at a tiny size on the CPU, each timing one call, 64-key splits (150 keys: three splits), and no
    FlashAttention row (vLLM's build of it needs a GPU)."""
    for name, value in {"DEVICE": "cpu", "HEADS": 4, "KV_HEADS": 2, "HEAD_DIM": 16, "PAGE": 16}.items():
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(aligned, "SPLIT", 64)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda call, **_: (call(), 1.0)[1])
    monkeypatch.setattr(bench, "flash_attention", lambda t, context: None)


def test_both_decode_paths_run_and_give_the_same_bits(tiny_bench, capsys):
    bench.decode_rows(2, 150)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 2
    assert "keys split (3 splits a sequence)" in rows[0] and rows[0].endswith("bits = one program's: True |")
    assert rows[1].endswith("1.00x the split's time |")


def test_variants_time_other_tiles_and_launches_and_say_whether_their_bits_are_the_shipped_ones(
    tiny_bench, monkeypatch, capsys
):
    # the shipped tile and split with another launch (the same sums), then a 16-key split (other sums)
    monkeypatch.setattr(bench, "VARIANTS", [(aligned.BLOCK_N, 64, 2, 2, 16), (16, 16, 4, 3, 16)])
    shipped = aligned.BLOCK_N, aligned.SPLIT, aligned._LAUNCH, aligned.BLOCK_M
    bench.decode_rows(2, 150)
    bench.prefill_rows(70)
    assert shipped == (aligned.BLOCK_N, aligned.SPLIT, aligned._LAUNCH, aligned.BLOCK_M)  # put back after each row
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 + 3
    assert "16-row query tiles, 64-key tiles, 64-key splits, 2 warps" in rows[2]
    assert rows[2].endswith("bits = shipped's: True |")
    assert "16-key tiles, 16-key splits" in rows[3] and rows[3].endswith("bits = shipped's: False |")
    assert "aligned prefill (one prompt)" in rows[4] and "| - |" in rows[4]
    assert rows[5].endswith("bits = shipped's: True |") and rows[6].endswith("bits = shipped's: False |")


def test_a_variant_must_split_on_its_tiles():
    import argparse

    assert bench.parse_variant("128,1024,8,3") == (128, 1024, 8, 3, aligned.BLOCK_M)
    assert bench.parse_variant("64,1024,4,3,64") == (64, 1024, 4, 3, 64)
    for bad in ("128,1000,4,3", "24,96,4,3", "64,1024,4", "64,1024,x,3", "64,1024,4,3,48"):
        with pytest.raises(argparse.ArgumentTypeError, match="BLOCK_N,SPLIT,WARPS,STAGES"):
            bench.parse_variant(bad)
