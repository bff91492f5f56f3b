"""`bench_aligned_linear_attn` wires each kernel with its own arguments: every row runs at a tiny size on the CPU
interpreter (the timings themselves need a GPU)."""

import argparse

import pytest

from benchmarks import bench_aligned_linear_attn as bench


def test_every_row_runs_and_shapes_parse(monkeypatch, capsys):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "DIM", 16)
    monkeypatch.setattr(bench, "median_us", lambda call, graph: (call(), (1000.0, "graph"))[1])
    monkeypatch.setattr(bench, "TOKEN_TILES", [(16, 2), (8, 1)])
    monkeypatch.setattr(bench, "WINDOW_LAUNCHES", [(32, 4, 1, 1, 16), (16, 2, 1, 2, 16)])
    for name in ("ALIGNED_BLOCK_V", "ALIGNED_NUM_WARPS"):  # each row sets them; put back after the test
        monkeypatch.setattr(bench.aligned, name, getattr(bench.aligned, name))
    shipped = ("WINDOWED_BLOCK_V", "WINDOWED_LAUNCH", "WINDOWED_DECODE_LAUNCH", "WINDOWED_DECODE_TILES", "OUTPUT_ROWS")
    for name in shipped:
        monkeypatch.setattr(bench.windowed, name, getattr(bench.windowed, name))
    bench.prefill_row(2, 70)
    bench.decode_row(3)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 12 and all("| 1.000 | 1.00 | graph |" in row for row in rows)
    assert sum("V-tile 8, 1 warps" in row for row in rows) == 2
    # the window form's second launch against its first: the interpreter's sums follow the tiles too
    windows = [row for row in rows if "windows" in row]
    assert len(windows) == 6 and all("bits = first window form's: True" in row for row in windows[::2])
    assert "one-token kernel, V-tile 32, 4 warps" in windows[4]  # the decode step's one-token kernel, same bits
    assert bench.parse_token_tiles("8,1") == (8, 1)
    assert bench.parse_window_launch("16,2,1") == (16, 2, 1, 1, 16)
    assert bench.parse_window_launch("32,8,1,4") == (32, 8, 1, 4, 16)
    assert bench.parse_window_launch("32,8,1,1,64") == (32, 8, 1, 1, 64)
    assert sum("2 tiles a program" in row for row in windows) == 3
    for bad in ("16,2", "32,8,1,1,48"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"give BLOCK_V,WARPS,STAGES\[,TILES\[,ROWS\]\]"):
            bench.parse_window_launch(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="give BLOCK_V,WARPS"):
        bench.parse_token_tiles("12,2")
    assert bench.parse_shape("2x4096") == (2, 4096)
    with pytest.raises(argparse.ArgumentTypeError, match="give BxL"):
        bench.parse_shape("4096")
