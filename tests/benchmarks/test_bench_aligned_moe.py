import argparse

import pytest

from benchmarks.bench_aligned_moe import parse_tiles


def test_tiles_parse_as_three_powers_of_two_and_an_optional_launch():
    assert parse_tiles("64,128,32") == (64, 128, 32)
    assert parse_tiles("16,64,128,8,4") == (16, 64, 128, 8, 4)
    assert parse_tiles("16,64,128,4,3,1") == (16, 64, 128, 4, 3, True)
    for bad in ("64,128", "64,100,32", "8,64,32", "a,b,c", "16,64,128,8", "16,64,128,0,3", "16,64,128,4,3,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="BLOCK_M,BLOCK_N,BLOCK_K"):
            parse_tiles(bad)
