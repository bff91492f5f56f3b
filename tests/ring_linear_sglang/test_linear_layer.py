"""The SGLang linear-attention layer (the model's module, our backend, SGLang's state pool and batches) against
the training shim's layer, over three steps that share the slots: fresh prefills, then continuing chunks
(one of a single token), then a decode. Triton interpreter on the CPU; the tiny checkpoint's layer 0; at TP 1 in
this process and at TP 2 on two gloo ranks (each holding half the heads and its share of the state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang")


def test_the_layer_over_three_steps_equals_the_shim(sglang_world, tiny_dir, layer_errors):
    errors = layer_errors(tiny_dir)
    assert max(errors) < 1e-4, f"relative max abs error per step: {errors}"


def test_the_layer_at_tp_2_on_two_ranks_equals_the_shim(sglang_registered, tiny_dir, released_dir, tmp_path):
    from common_kernels.testing import run_ranks

    worker = Path(__file__).with_name("tp_worker.py")
    for rank, out in enumerate(run_ranks(worker, [tiny_dir, released_dir], tmp_path, timeout_s=900)):
        errors = torch.load(out)
        assert len(errors) == 3 and max(errors) < 1e-4, f"rank {rank}: relative max abs error per step: {errors}"
