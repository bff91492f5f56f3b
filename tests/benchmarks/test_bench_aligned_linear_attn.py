"""`bench_aligned_linear_attn` wires each kernel with its own arguments: every row runs at a tiny size on the CPU
interpreter (the timings themselves need a GPU)."""

import argparse

import pytest
import triton.testing

from benchmarks import bench_aligned_linear_attn as bench


def test_every_row_runs_and_shapes_parse(monkeypatch, capsys):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "DIM", 16)
    monkeypatch.setattr(triton.testing, "do_bench", lambda call, **_: (call(), 1.0)[1])
    monkeypatch.setattr(bench, "TOKEN_TILES", [(16, 2), (8, 1)])
    for name in ("ALIGNED_BLOCK_V", "ALIGNED_NUM_WARPS"):  # each row sets them; put back after the test
        monkeypatch.setattr(bench.aligned, name, getattr(bench.aligned, name))
    bench.prefill_row(2, 70)
    bench.decode_row(3)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 8 and all(row.endswith("| 1.000 | 1.00 |") for row in rows)
    assert sum("V-tile 8, 1 warps" in row for row in rows) == 2
    assert bench.parse_token_tiles("8,1") == (8, 1)
    with pytest.raises(argparse.ArgumentTypeError, match="give BLOCK_V,WARPS"):
        bench.parse_token_tiles("12,2")
    assert bench.parse_shape("2x4096") == (2, 4096)
    with pytest.raises(argparse.ArgumentTypeError, match="give BxL"):
        bench.parse_shape("4096")
