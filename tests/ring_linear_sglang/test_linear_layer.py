"""The SGLang linear-attention layer (the model's module, our backend, SGLang's state pool and batches) against
the training shim's layer, over three steps that share the slots: fresh prefills, then continuing chunks
(one of a single token), then a decode. Triton interpreter on the CPU; the tiny checkpoint's layer 0; at TP 1 in
this process and at TP 2 on two gloo ranks (each holding half the heads and its share of the state)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang")


def test_the_layer_over_three_steps_equals_the_shim(sglang_world, tiny_dir, layer_errors):
    errors = layer_errors(tiny_dir)
    assert max(errors) < 1e-4, f"relative max abs error per step: {errors}"


def test_the_layer_at_tp_2_on_two_ranks_equals_the_shim(sglang_registered, tiny_dir, released_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("tp_worker.py")
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(tiny_dir), str(released_dir), str(rank), str(port), str(outs[rank])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    for rank, out in enumerate(outs):
        errors = torch.load(out)
        assert len(errors) == 3 and max(errors) < 1e-4, f"rank {rank}: relative max abs error per step: {errors}"
