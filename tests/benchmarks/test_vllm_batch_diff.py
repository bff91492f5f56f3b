"""vllm_batch_diff finds a request's rows in a step by their positions and token ids."""

import torch

from benchmarks.vllm_batch_diff import rows_of

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def test_a_chunk_and_a_prompt_start_are_found_and_stray_rows_are_not():
    # another request's rows (one at a matching position and id), a chunk at positions 3-6, a foreign row, the start
    ids = torch.tensor([1, 10, 8, 9, 10, 11, 3, 5, 6])
    positions = torch.tensor([4, 5, 3, 4, 5, 6, 7, 0, 1])
    assert rows_of(PROMPT, ids, positions) == [(2, 3, 4), (7, 0, 2)]


def test_a_chunk_whose_token_is_wrong_stops_there():
    ids = torch.tensor([8, 9, 10, 99, 12])
    positions = torch.tensor([3, 4, 5, 6, 7])
    assert rows_of(PROMPT, ids, positions) == [(0, 3, 3)]
