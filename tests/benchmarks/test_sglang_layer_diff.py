"""The layer-diff tool's CPU half: the shim's per-module outputs by checkpoint name, and the comparison."""

from __future__ import annotations

import torch

from benchmarks import sglang_layer_diff


def test_the_shim_dump_names_modules_as_the_checkpoint_does_and_compares_to_itself_exactly(tmp_path):
    from common_kernels import RingLinearForCausalLM, tiny_config

    model = RingLinearForCausalLM(tiny_config())
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    outputs = sglang_layer_diff.shim_outputs(str(tmp_path), [3, 5, 7], torch.float32, device="cpu")
    assert "model.layers.0.attention.query_key_value" in outputs and "model.layers.0.input_layernorm" in outputs
    rows = sglang_layer_diff.compare(outputs, outputs)
    assert len(rows) == len(outputs) and all(diff == 0 for _, diff, _ in rows)
    shifted = dict(outputs, **{"model.norm": outputs["model.norm"] + 1})
    diffs = {name: diff for name, diff, _ in sglang_layer_diff.compare(shifted, outputs)}
    assert abs(diffs["model.norm"] - 1) < 1e-6
