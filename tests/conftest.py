import json
import os
import random
import socket
import subprocess
import time
import urllib.request
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


@pytest.fixture
def openai_completion(tmp_path):
    """`openai_completion(command, model)`: start an engine's OpenAI server (`command` plus `--port`), wait for its
    `/health` (10 min at most), ask for one greedy 4-token completion with logprobs, stop the server; returns the
    reply's first choice. A server that exits early fails with the tail of its log."""

    def complete(command: list[str], model: str) -> dict:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_path = tmp_path / "server.log"
        with log_path.open("w") as log:
            server = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "the server did not come up"
                time.sleep(2)
            body = {"model": model, "prompt": "a1 b2 c3|b:", "max_tokens": 4, "temperature": 0, "logprobs": 1}
            url, headers = f"http://127.0.0.1:{port}/v1/completions", {"Content-Type": "application/json"}
            request = urllib.request.Request(url, json.dumps(body).encode(), headers)
            with urllib.request.urlopen(request, timeout=60) as reply:
                return json.loads(reply.read())["choices"][0]
        finally:
            server.terminate()
            server.wait(60)

    return complete
