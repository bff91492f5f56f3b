"""Fixtures for the vLLM adapter tests (they need `pip install -e .[vllm]`; CI runs them in a second venv).

Without a GPU, vLLM's PyPI (CUDA) wheel detects no platform (0.26: "Device string must not be empty") and
its stock CPU platform needs the `+cpu` build's ops. `vllm_env` then installs a minimal CPU platform that
only answers what config creation and model construction ask; no forward pass runs on it. With a GPU the
real platform is used and models are built on the GPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from common_kernels import RingLinearForCausalLM, tiny_config

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _install_cpu_platform() -> None:
    import vllm.platforms as platforms
    from vllm.platforms.interface import Platform, PlatformEnum

    class CpuTestPlatform(Platform):
        _enum = PlatformEnum.OOT
        device_name = "cpu"
        device_type = "cpu"
        dispatch_key = "CPU"
        dist_backend = "gloo"
        supported_dtypes = [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
            return "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"

        @classmethod
        def num_compute_units(cls, device_id: int = 0) -> int:
            return 1

        @classmethod
        def is_pin_memory_available(cls) -> bool:
            return False

    platforms.current_platform = CpuTestPlatform()


@pytest.fixture(scope="session")
def vllm_env():
    """vLLM imported, a platform in place, and the plugins loaded as every vLLM process loads them."""
    pytest.importorskip("vllm")
    if DEVICE == "cpu":
        _install_cpu_platform()
    from vllm.plugins import load_general_plugins

    load_general_plugins()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random tiny Ring-linear checkpoint in HF format (config.json + safetensors)."""
    path = tmp_path_factory.mktemp("tiny")
    model = RingLinearForCausalLM(tiny_config())
    model.init_weights(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-trivial norms and router bias, so a mis-mapped one shows
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name or name.endswith("expert_bias"):
                tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model.save_pretrained(path)
    return path


def make_engine_config(model_dir, **engine_kwargs):
    """`VllmConfig` for a local model directory through vLLM's own config path (no hub, no tokenizer)."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {
        "model": str(model_dir),
        "skip_tokenizer_init": True,
        "enforce_eager": True,
        "max_model_len": 256,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 256,
        "dtype": "float32",
    } | engine_kwargs
    return EngineArgs(**kwargs).create_engine_config()


@contextmanager
def single_rank(vllm_config):
    """A 1-rank process group and `vllm_config` as the current config, as model construction needs."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    with set_current_vllm_config(vllm_config):
        if not ps.model_parallel_is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            backend = "nccl" if DEVICE == "cuda" else "gloo"
            ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend=backend)
            ps.initialize_model_parallel(1, 1)
        yield


def build_model(vllm_config):
    """The plugin's model, constructed (uninitialised weights) on this machine's device."""
    from ring_linear_vllm.model import RingLinearForCausalLM as VllmModel

    with single_rank(vllm_config), torch.device(DEVICE):
        return VllmModel(vllm_config=vllm_config, prefix="")


def common_metadata(query_lens: list[int], seq_lens: list[int], slots: list[int], device):
    """vLLM's per-step batch description for requests already ordered decodes-first, one state slot each."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    query_start = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=query_start.to(device),
        query_start_loc_cpu=query_start,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        num_reqs=len(query_lens),
        num_actual_tokens=sum(query_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_table_tensor=torch.tensor(slots, dtype=torch.int32, device=device)[:, None],
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64, device=device),
    )


@pytest.fixture(scope="session")
def vllm_tools(vllm_env):
    """The helpers above, for test modules (importlib import mode keeps conftest out of their namespace)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        engine_config=make_engine_config,
        single_rank=single_rank,
        build_model=build_model,
        common_metadata=common_metadata,
    )
