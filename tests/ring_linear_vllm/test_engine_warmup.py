"""vLLM's step kernels warmed at start-up for our model: the hook is wrapped once, reaches only our model type,
and launches the real slot-mapping kernel on a block table laid out as Ring-mini's softmax layers are."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from common_kernels import RingLinearConfig  # noqa: E402
from ring_linear_vllm import engine_warmup  # noqa: E402


class RecordingZeroer:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def zero_block_ids(self, block_ids: list[int]) -> None:
        self.calls.append(block_ids)


class RecordingSteps:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []

    def __call__(self, num_tokens: int, **kwargs) -> None:
        self.calls.append((num_tokens, kwargs))


class RecordingBlockTables:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int], int]] = []

    def compute_slot_mapping(self, num_reqs: int, query_start_loc: torch.Tensor, positions: torch.Tensor) -> None:
        self.calls.append((num_reqs, query_start_loc.tolist(), positions.numel()))


def fake_runner(num_blocks: int = 1000) -> SimpleNamespace:
    return SimpleNamespace(
        device=torch.device("cpu"),
        max_num_tokens=8192,
        cudagraph_batch_sizes=[1, 2, 4, 8, 16, 512],
        _dummy_run=RecordingSteps(),
        input_batch=SimpleNamespace(block_table=RecordingBlockTables()),
        _kv_block_zeroer=RecordingZeroer(),
        kv_cache_config=SimpleNamespace(num_blocks=num_blocks),
    )


def model_config(model_type: str) -> SimpleNamespace:
    return SimpleNamespace(hf_config=SimpleNamespace(model_type=model_type))


@pytest.fixture
def hook(vllm_env, monkeypatch):
    """vLLM's warm-up module with a recording stand-in for its Qwen hook, then ours installed over it."""
    from vllm.model_executor.warmup import kernel_warmup

    seen = []
    monkeypatch.setattr(kernel_warmup, "qwen_triton_warmup", lambda runner, config: seen.append(config))
    engine_warmup.install()
    engine_warmup.install()  # idempotent: wrapped once
    return kernel_warmup, seen


def test_the_hook_is_wrapped_once_and_still_calls_vllms(hook):
    kernel_warmup, seen = hook
    wrapped = kernel_warmup.qwen_triton_warmup
    assert wrapped.ring_linear
    other = model_config("qwen3_next")
    runner = fake_runner()
    wrapped(runner, other)
    assert seen == [other]
    assert runner.input_batch.block_table.calls == [] and runner._kv_block_zeroer.calls == []
    assert runner._dummy_run.calls == []


def test_our_model_type_warms_the_slot_mapping_and_every_zeroing_specialisation(hook):
    kernel_warmup, seen = hook
    runner = fake_runner()
    kernel_warmup.qwen_triton_warmup(runner, model_config(RingLinearConfig.model_type))
    assert len(seen) == 1
    assert runner.input_batch.block_table.calls == [(0, [0], 0)]
    assert [len(ids) for ids in runner._kv_block_zeroer.calls] == [1, 2, 16]
    assert runner._dummy_run.calls == [(8191, {"skip_eplb": True, "remove_lora": False})]
    small = fake_runner(num_blocks=4)
    engine_warmup.warm_step_kernels(small)
    assert all(max(ids) < 4 for ids in small._kv_block_zeroer.calls)


@pytest.mark.parametrize("caching, mode, copies", [(True, "align", 1), (False, "none", 0), (True, "all", 0)])
def test_align_mode_prefix_caching_warms_vllms_state_copy_with_a_copy_of_nothing(
    vllm_env, monkeypatch, caching, mode, copies
):
    from vllm.v1.worker import mamba_utils

    calls = []
    monkeypatch.setattr(mamba_utils, "batch_memcpy", lambda *tensors: calls.append(tensors))
    runner = fake_runner()
    runner.cache_config = SimpleNamespace(enable_prefix_caching=caching, mamba_cache_mode=mode)
    engine_warmup.warm_state_copy(runner)
    assert len(calls) == copies
    for src, dst, sizes in calls:  # the dtypes of vLLM's MambaCopyBuffers; nothing to copy
        assert (src.dtype, dst.dtype, sizes.dtype) == (torch.uint64, torch.uint64, torch.int32)
        assert sizes.tolist() == [0] and src.data_ptr() != dst.data_ptr()
    engine_warmup.warm_state_copy(fake_runner())  # a runner without a cache config (vLLM's Qwen path) is left alone


def test_the_odd_step_is_the_largest_odd_count_outside_the_graphs():
    assert engine_warmup.odd_step_size(8192, [1, 2, 512]) == 8191
    assert engine_warmup.odd_step_size(8191, [1, 2, 512]) == 8191
    assert engine_warmup.odd_step_size(2048, []) == 2047  # eager: no graphs
    assert engine_warmup.odd_step_size(512, [1, 2, 512]) is None  # every step fits a graph, padded to an even size


@pytest.mark.gpu  # without a GPU vLLM swaps Triton for a placeholder, so its kernel cannot run here
def test_the_slot_mapping_launch_pads_a_real_block_table(vllm_env):
    """vLLM's own BlockTable at Ring-mini's softmax layout (512-token blocks, in 16-token kernel blocks where the
    release splits them): the warm launch with no request runs the kernel and leaves only padding."""
    import inspect

    from vllm.v1.attention.backends.utils import PAD_SLOT_ID
    from vllm.v1.worker.block_table import BlockTable

    layout = {"block_size": 512, "max_num_reqs": 4, "max_num_blocks_per_req": 8, "max_num_batched_tokens": 64}
    layout |= {"pin_memory": False, "device": torch.device("cuda"), "cp_kv_cache_interleave_size": 1}
    if "kernel_block_size" in inspect.signature(BlockTable).parameters:  # 0.26; 0.33 sizes kernel blocks elsewhere
        layout["kernel_block_size"] = 16
    table = BlockTable(**layout)
    table.slot_mapping.gpu.fill_(7)
    tables = SimpleNamespace(compute_slot_mapping=table.compute_slot_mapping)
    engine_warmup.warm_step_kernels(
        SimpleNamespace(device=torch.device("cuda"), input_batch=SimpleNamespace(block_table=tables))
    )
    assert bool((table.slot_mapping.gpu == PAD_SLOT_ID).all())
