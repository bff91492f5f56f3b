"""Fixtures for the SGLang adapter tests (they need SGLang; CI runs them in one venv per release).

SGLang's launcher-side code (config parsing, server-argument resolution) runs on a CPU-only machine when the
device is given as "cpu"; nothing here imports SGLang's GPU kernels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

RELEASED_CONFIG = Path(__file__).parents[1] / "data" / "ring-mini-linear-2.0.config.json"


@pytest.fixture(scope="session")
def sglang_registered():
    """SGLang imported and the adapter registered, as SGLang's plugin loader would."""
    pytest.importorskip("sglang")
    import ring_linear_sglang

    ring_linear_sglang.register()
    return ring_linear_sglang


@pytest.fixture(scope="session")
def released_dir(tmp_path_factory) -> Path:
    """A folder holding only the released Ring-mini-linear-2.0 `config.json` (no remote code, no weights)."""
    path = tmp_path_factory.mktemp("ring-mini")
    shutil.copy(RELEASED_CONFIG, path / "config.json")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random tiny Ring-linear checkpoint in the HF format (config.json + safetensors)."""
    import torch

    from common_kernels import RingLinearForCausalLM, tiny_config

    path = tmp_path_factory.mktemp("tiny")
    model = RingLinearForCausalLM(tiny_config())
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sglang_world(sglang_registered, released_dir):
    """What SGLang's model construction reads: published server arguments and a one-rank (gloo) world."""
    import os

    from sglang.srt import runtime_context
    from sglang.srt.distributed import parallel_state

    from ring_linear_sglang.compat import resolve_server_args

    args = resolve_server_args(model_path=str(released_dir), skip_tokenizer_init=True, device="cpu")
    runtime_context.publish(args, role="test")
    if not parallel_state.model_parallel_is_initialized():
        port = 29700 + os.getpid() % 1000
        parallel_state.init_distributed_environment(
            backend="gloo", world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}"
        )
        parallel_state.initialize_model_parallel()  # tp 1: 0.5.23 reads the published widths, 0.5.17 defaults
    override = getattr(runtime_context.get_parallel(), "override", None)
    if override is not None:  # 0.5.23 reads this process's ranks from the context, which a launcher writes
        groups = ("tp", "pp", "moe_ep", "moe_tp", "moe_dp", "attn_tp", "attn_cp", "attn_dp", "dcp", "attn_dcp")
        ranks = override(**{f"{g}_size": 1 for g in groups}, **{f"{g}_rank": 0 for g in groups})
        ranks.__enter__()
        _kept_alive.append(ranks)  # a collected context manager would undo the override
    return args


_kept_alive: list = []


@pytest.fixture(scope="session")
def lightning_kit():
    """SGLang's Lightning attention test kit: a mock model runner over real pools, and real batches."""
    return pytest.importorskip("sglang.test.kits.attention_unittest.attention_methods.lightning_attention")


@pytest.fixture(scope="session")
def mock_backend(lightning_kit):
    """`mock_backend(case, config)`: our backend over the kit's mock runner, whose one-layer state pool (layer 0)
    is sized from `case` and `config`, fp32; returns (runner, backend)."""
    import torch

    from ring_linear_sglang.backend import RingLinearAttnBackend

    def build(case, config):
        kit = lightning_kit
        model_config = kit.TinyLightningModelConfig(
            num_heads=config.num_attention_heads, head_dim=config.head_dim, context_len=kit.DEFAULT_MAX_CONTEXT_LEN,
            num_hidden_layers=1,
        )  # fmt: skip
        runner = kit.MockLightningModelRunner(
            case=case, model_config=model_config, dtype=torch.float32, device="cpu",
            max_context_len=kit.DEFAULT_MAX_CONTEXT_LEN, head_dim=config.head_dim,
        )  # fmt: skip
        model_config.hf_config = config
        assert 0 in config.linear_layer_ids  # the kit's pool holds layer 0
        return runner, RingLinearAttnBackend(runner)

    return build
