"""`bench_aligned_attention` runs both of our decode paths on one cache and compares their bits: its rows at a tiny
size on the CPU interpreter (the timings themselves, and FlashAttention's row, need a GPU)."""

import triton.testing

from benchmarks import bench_aligned_attention as bench
from common_kernels.ops.attention import aligned


def test_both_decode_paths_run_and_give_the_same_bits(monkeypatch, capsys):
    for name, value in {"DEVICE": "cpu", "HEADS": 4, "KV_HEADS": 2, "HEAD_DIM": 16, "PAGE": 16}.items():
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(aligned, "SPLIT", 64)  # 150 keys: three splits
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda call, **_: (call(), 1.0)[1])
    monkeypatch.setattr(bench, "flash_attention", lambda t, context: None)  # vLLM's build of it needs a GPU
    bench.decode_rows(2, 150)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 2
    assert "keys split (3 splits a sequence)" in rows[0] and rows[0].endswith("bits = one program's: True |")
    assert rows[1].endswith("1.00x the split's time |")
