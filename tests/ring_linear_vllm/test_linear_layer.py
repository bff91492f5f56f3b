"""The vLLM linear-attention layer against the training shim's, on the Triton kernels (interpreted on CPU).

A mixed step (a continuing decode, a one-token prompt, a new prompt, the second chunk of a chunked
prefill, every slot holding stale memory) must give, token for token, what the shim computes over the
whole sequences; with tensor parallelism 2 each rank holds half the heads and norm groups.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

WORKER = Path(__file__).with_name("tp_worker.py")


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), f"max abs error {err} (output scale {want.abs().max().item()})"


def test_mixed_prefill_decode_step_matches_the_shim(vllm_tools, tiny_dir):
    _assert_close(vllm_tools.mixed_step_output(tiny_dir), vllm_tools.mixed_step_reference(tiny_dir))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-rank CPU (gloo) run; GPUs run TP through vLLM itself")
def test_tensor_parallel_2_matches_the_shim(vllm_tools, tiny_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tiny_dir), str(rank), "2", str(port), str(tmp_path / f"rank{rank}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)
    outputs = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert torch.equal(outputs[0], outputs[1])  # the row-parallel dense all-reduces
    _assert_close(outputs[0], vllm_tools.mixed_step_reference(tiny_dir))
