"""The layer-diff tool's CPU half: the shim's per-module outputs by checkpoint name, the comparison, and the
module-local checks (each engine part on its own dumped input), on dumps made from the shim itself."""

from __future__ import annotations

import pytest
import torch

from benchmarks import sglang_layer_diff

PROMPT = [3, 5, 7, 11, 2]


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    from common_kernels import RingLinearForCausalLM, tiny_config

    path = tmp_path_factory.mktemp("tiny")
    model = RingLinearForCausalLM(tiny_config())
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    return RingLinearForCausalLM.from_pretrained(path, use_triton=False)


def test_the_shim_dump_names_modules_as_the_checkpoint_does_and_compares_to_itself_exactly(shim):
    with torch.no_grad():
        before = shim(torch.tensor([PROMPT]))
    outputs = sglang_layer_diff.shim_outputs(shim, PROMPT, device="cpu")
    with torch.no_grad():
        assert torch.equal(shim(torch.tensor([PROMPT])), before)  # the hooks neither changed nor stayed
    assert "model.layers.0.attention.query_key_value" in outputs and "model.layers.0.input_layernorm" in outputs
    rows = sglang_layer_diff.compare(outputs, outputs)
    assert len(rows) == len(outputs) and all(diff == 0 for _, diff, _ in rows)
    shifted = dict(outputs, **{"model.norm": outputs["model.norm"] + 1})
    diffs = {name: diff for name, diff, _ in sglang_layer_diff.compare(shifted, outputs)}
    assert abs(diffs["model.norm"] - 1) < 1e-6


def _engine_like_dump(shim, outputs: dict, shared_input_from_routed: bool = False) -> dict:
    """What SGLang's dump holds, made from the shim: routed experts and shared experts as separate leaves, and
    each attention's core output; optionally the shared experts fed the routed output (the fault it found)."""
    from common_kernels.ops.moe.naive import moe_combine

    c, T = shim.config, len(PROMPT)
    dump = {}
    for l, layer in enumerate(shim.model.layers):
        base = f"model.layers.{l}"
        x = outputs[f"{base}.post_attention_layernorm"].reshape(T, -1)
        dump[f"{base}.post_attention_layernorm"] = x
        qkv = outputs[f"{base}.attention.query_key_value"].reshape(T, -1)
        dump[f"{base}.attention.query_key_value"] = qkv
        if not c.is_moe_layer(l):
            continue
        mlp = layer.mlp
        with torch.no_grad():
            ids, weights = mlp.route(x)
            routed = moe_combine(x, ids, weights, mlp.experts)
            shared = mlp.shared_experts(routed if shared_input_from_routed else x)
        dump[f"{base}.mlp.experts"], dump[f"{base}.mlp.shared_experts.down_proj"] = routed, shared
        dump[f"{base}.mlp.topk"] = [weights / c.routed_scaling_factor, ids.float(), ids.float()]
    return dump


def test_the_local_checks_pass_a_right_moe_and_name_shared_experts_fed_the_wrong_input(shim):
    outputs = sglang_layer_diff.shim_outputs(shim, PROMPT, device="cpu")
    right_dump = _engine_like_dump(shim, outputs)
    right = {name: diff for name, diff, _ in sglang_layer_diff.local_checks(right_dump, shim, "cpu")}
    mlp_rows = [name for name in right if name.endswith("mlp (local)")]
    assert mlp_rows and all(right[name] < 1e-5 for name in mlp_rows)
    assert all(right[name] == 0 for name in right if "topk ids" in name)
    wrong_dump = _engine_like_dump(shim, outputs, shared_input_from_routed=True)
    wrong = {name: diff for name, diff, _ in sglang_layer_diff.local_checks(wrong_dump, shim, "cpu")}
    assert all(wrong[name] > 1e-3 for name in mlp_rows)
