import os
import random
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> Path:
    """The trained tiny checkpoint of the engines' GPU tests: RING_LINEAR_TINY_CHECKPOINT (e.g. `ring-linear
    demo`'s), else one trained here (600 steps)."""
    given = os.environ.get("RING_LINEAR_TINY_CHECKPOINT")
    if given:
        return Path(given)
    from common_kernels.tiny.train import make_tiny_checkpoint, train

    path = tmp_path_factory.mktemp("tiny-trained")
    make_tiny_checkpoint(path / "init")
    train(path / "init", path / "trained", steps=600)
    return path / "trained"


@pytest.fixture(scope="session")
def recall_prompts():
    """`recall_prompts(tokenizer, n, seed=0)`: recall prompts of 2-12 pairs (12-70 tokens), the trained task and
    longer variants, as token ids."""
    from common_kernels.tiny.task import make_sample

    def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
        rng = random.Random(seed)
        return [
            tokenizer(make_sample(rng, num_pairs=rng.randint(2, 12), num_queries=2).prompt).input_ids for _ in range(n)
        ]

    return prompts
