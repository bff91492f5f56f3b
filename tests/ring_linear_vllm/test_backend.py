"""Per-step metadata: a mixed batch routes every request to its own state slot, new requests start at zero."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def builder(vllm_tools, tiny_dir):
    cfg = vllm_tools.engine_config(tiny_dir)
    model = vllm_tools.build_model(cfg)
    layer = model.model.layers[0].attention
    device = layer.decay_rate.device
    with vllm_tools.single_rank(cfg):
        return layer.get_attn_backend().get_builder_cls()(layer.get_kv_cache_spec(cfg), [layer.prefix], cfg, device)


def test_mixed_batch_routes_each_request_to_its_slot(builder, vllm_tools):
    device = builder.device
    # decodes first (vLLM reorders): a continuing sequence, then a one-token prompt; then a new prompt and
    # the second chunk of a chunked prefill
    common = vllm_tools.common_metadata([1, 1, 7, 6], seq_lens=[10, 1, 7, 20], slots=[5, 2, 3, 0], device=device)
    meta = builder.build(0, common)
    assert (meta.num_decodes, meta.num_decode_tokens, meta.num_prefills, meta.num_prefill_tokens) == (2, 2, 2, 13)
    step = meta.step
    assert (step.num_decode_tokens, step.num_prefill_tokens) == (2, 13)
    assert step.decode_slots.tolist() == [5, 2]
    assert step.decode_fresh.tolist() == [0, 1]  # the one-token prompt must not read its slot's old state
    assert step.prefill_slots.tolist() == [3, 0]
    assert step.prefill_cu_seqlens.tolist() == [0, 7, 13]
    assert step.prefill_fresh.tolist() == [1, 0]  # the second chunk continues from its slot
    plan = step.prefill_plan  # built once for every linear layer of the step
    assert plan.total_tokens == 13 and plan.nseg.tolist() == [1, 1] and plan.seg_seq.tolist()[:2] == [0, 1]


def test_the_kv_cache_groups_of_a_step_share_one_segment_plan(builder, vllm_tools):
    """vLLM builds a step's metadata once per KV-cache group (4 for Ring-mini): the plan is made once."""
    common = vllm_tools.common_metadata([1, 7, 6], seq_lens=[10, 7, 20], slots=[5, 3, 0], device=builder.device)
    first, second = builder.build(0, common), builder.build(0, common)
    assert second.step.prefill_plan is first.step.prefill_plan
    other = builder.build(0, vllm_tools.common_metadata([1, 6, 7], [10, 6, 20], [5, 3, 0], builder.device))
    assert other.step.prefill_plan is not first.step.prefill_plan


def test_prefill_only_and_decode_only_batches(builder, vllm_tools):
    device = builder.device
    meta = builder.build(0, vllm_tools.common_metadata([4, 3], [4, 9], [1, 6], device))
    assert meta.num_decodes == 0 and meta.step.decode_slots is None and meta.step.prefill_slots.tolist() == [1, 6]
    assert meta.step.prefill_cu_seqlens.tolist() == [0, 4, 7] and meta.step.prefill_fresh.tolist() == [1, 0]
    meta = builder.build(0, vllm_tools.common_metadata([1, 1, 1], [3, 8, 1], [4, 0, 7], device))
    step = meta.step
    assert meta.num_prefills == 0 and step.prefill_cu_seqlens is None and step.prefill_plan is None
    assert step.decode_slots.tolist() == [4, 0, 7] and step.decode_fresh.tolist() == [0, 0, 1]


def test_full_graph_decodes_get_the_persistent_slot_and_flag_buffers(builder, vllm_tools, monkeypatch):
    """A decode batch vLLM may replay in a full CUDA graph reads its slots and fresh flags from the builder's
    persistent buffers (the addresses the graph captured); the builder refuses a vLLM whose base class stops
    handing out the slot buffer, instead of letting a graph replay another step's slots."""
    from vllm.config import CUDAGraphMode

    monkeypatch.setattr(builder.compilation_config, "cudagraph_mode", CUDAGraphMode.FULL_AND_PIECEWISE)
    common = vllm_tools.common_metadata([1, 1, 1], [3, 8, 1], [4, 0, 7], builder.device)
    step = builder.build(0, common).step
    assert step.decode_slots.untyped_storage().data_ptr() == builder.decode_legacy_state_indices_tensor.data_ptr()
    assert step.decode_fresh.untyped_storage().data_ptr() == builder.decode_fresh_buffer.data_ptr()
    assert step.decode_fresh.tolist() == [0, 0, 1]
    from vllm.v1.attention.backends.linear_attn import BailingLinearAttentionMetadataBuilder as Base

    base_build = Base.build

    def build_with_a_copy(self, *args, **kwargs):  # a vLLM whose builder stopped using its persistent buffer
        metadata = base_build(self, *args, **kwargs)
        metadata.state_indices_tensor_d = metadata.state_indices_tensor_d.clone()
        return metadata

    monkeypatch.setattr(Base, "build", build_with_a_copy)
    with pytest.raises(RuntimeError, match="persistent slot buffer"):
        builder.build(0, common)
