"""The vLLM linear-attention layer against the training shim's, on the Triton kernels (interpreted on CPU).

A mixed step (a continuing decode, a one-token prompt, a new prompt, the second chunk of a chunked
prefill, every slot holding stale memory) must give, token for token, what the shim computes over the
whole sequences; with tensor parallelism 2 each rank holds half the heads and norm groups.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), f"max abs error {err} (output scale {want.abs().max().item()})"


def test_mixed_prefill_decode_step_matches_the_shim(vllm_tools, tiny_dir):
    _assert_close(vllm_tools.mixed_step_output(tiny_dir), vllm_tools.mixed_step_reference(tiny_dir))


def test_the_linear_layers_of_a_step_share_its_plan_and_rope_table(vllm_tools, tiny_dir):
    """Layers 0 and 1 (decays of their own) run on one metadata object: the second reuses what the first built."""
    layers = (0, 1)
    _assert_close(vllm_tools.mixed_step_output(tiny_dir, layers), vllm_tools.mixed_step_reference(tiny_dir, layers))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-rank CPU (gloo) run; GPUs run TP through vLLM itself")
def test_tensor_parallel_2_matches_the_shim(vllm_tools, tiny_dir, tmp_path):
    outputs = [torch.load(path) for path in vllm_tools.run_two_ranks("tp", tiny_dir, tmp_path)]
    assert torch.equal(outputs[0], outputs[1])  # the row-parallel dense all-reduces
    _assert_close(outputs[0], vllm_tools.mixed_step_reference(tiny_dir))


def test_a_rope_table_made_outside_a_cuda_graph_capture_is_not_reused_inside_one(vllm_tools, tiny_dir, monkeypatch):
    from types import SimpleNamespace

    cfg = vllm_tools.engine_config(tiny_dir)
    layer = vllm_tools.build_model(cfg).model.layers[0].attention
    positions = torch.arange(5, device=layer.inv_freq.device)
    step = SimpleNamespace(rope_cos_sin=None)
    eager = layer._cos_sin(positions, step)
    assert layer._cos_sin(positions, step)[0] is eager[0]  # the step's other layers reuse it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = layer._cos_sin(positions, step)  # a capture must record the kernels that make the table
    assert captured[0] is not eager[0] and torch.equal(captured[0], eager[0])
    assert layer._cos_sin(positions, step)[0] is captured[0]
