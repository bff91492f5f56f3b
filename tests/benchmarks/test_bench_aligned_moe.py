import argparse

import pytest

from benchmarks.bench_aligned_moe import parse_tiles


def test_tiles_parse_as_three_powers_of_two():
    assert parse_tiles("64,128,32") == (64, 128, 32)
    for bad in ("64,128", "64,100,32", "8,64,32", "a,b,c"):
        with pytest.raises(argparse.ArgumentTypeError, match="BLOCK_M,BLOCK_N,BLOCK_K"):
            parse_tiles(bad)
