"""Fixtures for the SGLang adapter tests (they need SGLang; CI runs them in one venv per release).

SGLang's launcher-side code (config parsing, server-argument resolution) runs on a CPU-only machine when the
device is given as "cpu"; nothing here imports SGLang's GPU kernels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

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


def start_world(released_dir: Path, tp_size: int = 1, rank: int = 0, port: int | None = None):
    """What SGLang's model construction reads: published server arguments (for the released config at `tp_size`)
    and a gloo world of `tp_size` ranks, this process being `rank`; returns the server arguments."""
    import inspect
    import os

    from sglang.srt import runtime_context
    from sglang.srt.distributed import parallel_state

    from ring_linear_sglang.compat import resolve_server_args

    args = resolve_server_args(model_path=str(released_dir), skip_tokenizer_init=True, device="cpu", tp_size=tp_size)
    runtime_context.publish(args, role="test")
    if not parallel_state.model_parallel_is_initialized():
        port = port or 29700 + os.getpid() % 1000
        parallel_state.init_distributed_environment(
            backend="gloo", world_size=tp_size, rank=rank, local_rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
        )  # fmt: skip
        if tp_size > 1:  # groups of a CPU (gloo) world: SGLang would set up NCCL and CUDA all-reduce for them
            _without_gpu_communicators(parallel_state)
        widths = inspect.signature(parallel_state.initialize_model_parallel).parameters
        # 0.5.17 takes the width; since, it reads the published server arguments' (tp_size above)
        parallel_state.initialize_model_parallel(
            **({"tensor_model_parallel_size": tp_size} if "tensor_model_parallel_size" in widths else {})
        )
    override = getattr(runtime_context.get_parallel(), "override", None)
    if override is not None:  # 0.5.23 reads this process's ranks from the context, which a launcher writes
        split = ("tp", "attn_tp", "moe_tp")  # every group the tensor-parallel ranks split (no EP, DP or CP)
        tensor = {f"{g}_size": tp_size for g in split} | {f"{g}_rank": rank for g in split}
        others = ("pp", "moe_ep", "moe_dp", "attn_cp", "attn_dp", "dcp", "attn_dcp")
        ranks = override(**tensor, **{f"{g}_size": 1 for g in others}, **{f"{g}_rank": 0 for g in others})
        ranks.__enter__()
        _kept_alive.append(ranks)  # a collected context manager would undo the override
    return args


def _without_gpu_communicators(parallel_state) -> None:
    import functools
    import inspect

    make_group = parallel_state.init_model_parallel_group
    accepted = inspect.signature(make_group).parameters
    off = ("use_pynccl", "use_custom_allreduce", "use_mscclpp_allreduce", "use_torch_symm_mem_allreduce")
    parallel_state.init_model_parallel_group = functools.partial(make_group, **{k: False for k in off if k in accepted})


@pytest.fixture(scope="session")
def sglang_world(sglang_registered, released_dir):
    """`start_world` for one rank."""
    return start_world(released_dir)


_kept_alive: list = []


@pytest.fixture(scope="session")
def lightning_kit():
    """SGLang's Lightning attention test kit: a mock model runner over real pools, and real batches."""
    return pytest.importorskip("sglang.test.kits.attention_unittest.attention_methods.lightning_attention")


def build_mock_backend(kit, case, config):
    """Our backend over the Lightning kit's mock runner, whose one-layer state pool (layer 0) is sized from `case`
    and `config`, fp32; returns (runner, backend)."""
    import torch

    from ring_linear_sglang.backend import RingLinearAttnBackend

    model_config = kit.TinyLightningModelConfig(
        num_heads=case.num_heads, head_dim=config.head_dim, context_len=kit.DEFAULT_MAX_CONTEXT_LEN,
        num_hidden_layers=1,
    )  # fmt: skip
    runner = kit.MockLightningModelRunner(
        case=case, model_config=model_config, dtype=torch.float32, device="cpu",
        max_context_len=kit.DEFAULT_MAX_CONTEXT_LEN, head_dim=config.head_dim,
    )  # fmt: skip
    model_config.hf_config = config
    assert 0 in config.linear_layer_ids  # the kit's pool holds layer 0
    return runner, RingLinearAttnBackend(runner)


@pytest.fixture(scope="session")
def mock_backend(lightning_kit):
    """`mock_backend(case, config)`: `build_mock_backend` with the kit."""
    return lambda case, config: build_mock_backend(lightning_kit, case, config)


# The linear layer against the shim's (test_linear_layer.py; at TP 2 also in tp_worker.py's two processes)
LENGTHS = (8, 5, 14)  # whole sequences
STEPS = [("extend", (0, 0, 0), (5, 3, 9)), ("extend", (5, 3, 9), (2, 1, 4)), ("decode", (7, 4, 13), (1, 1, 1))]


def _layer_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(length, 64, generator=g) for length in LENGTHS]


def _shim_layer_outputs(tiny_dir) -> list[torch.Tensor]:
    """Layer 0 of the shim (float references) over the whole sequences, from zero states."""
    from common_kernels import RingLinearForCausalLM
    from common_kernels.model.layers import ForwardContext
    from common_kernels.ops.rope.naive import rotary_cos_sin, rotary_inv_freq

    shim = RingLinearForCausalLM.from_pretrained(tiny_dir, use_triton=False)
    full = torch.cat(_layer_inputs())
    positions = torch.cat([torch.arange(length) for length in LENGTHS])
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    cos, sin = rotary_cos_sin(positions, *rotary_inv_freq(shim.config), torch.float32)
    with torch.no_grad():
        out = shim.model.layers[0].attention(full, ForwardContext(cu, torch.tensor(cu), cos, sin, cache=None))
    return [out[a:b] for a, b in zip(cu[:-1], cu[1:], strict=True)]


def linear_layer_errors(tiny_dir: Path, kit, tp_size: int = 1) -> list[float]:
    """Layer 0 of the SGLang model (this rank's share at `tp_size`, its output all-reduced by `dense`) over the
    three STEPS that share the slots, on a pool of stale memory, against the shim's layer over the whole
    sequences: each step's max abs error relative to the largest output."""
    from safetensors.torch import load_file
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    from common_kernels.ops.rope.naive import rotary_cos_sin
    from ring_linear_sglang.config import RingLinearSGLangConfig
    from ring_linear_sglang.model import RingLinearForCausalLM

    config = RingLinearSGLangConfig.from_pretrained(tiny_dir)
    model = RingLinearForCausalLM(config=config)
    model.load_weights(load_file(next(tiny_dir.glob("*.safetensors"))).items())
    layer = model.model.layers[0].attention
    heads = config.num_attention_heads // tp_size

    def case(mode, prefix_lens, extend_lens):
        forward_mode = ForwardMode.DECODE if mode == "decode" else ForwardMode.EXTEND
        return kit.LightningAttentionCase(
            name=f"ring_{mode}", backend="triton", forward_mode=forward_mode, num_heads=heads, page_size=1,
            prefix_lens=prefix_lens, extend_lens=() if mode == "decode" else extend_lens,
        )  # fmt: skip

    runner, backend = build_mock_backend(kit, case(*STEPS[0]), config)
    pool = runner.req_to_token_pool.mamba2_layer_cache(0).temporal
    pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(9)))  # stale memory everywhere
    hidden, want = _layer_inputs(), _shim_layer_outputs(tiny_dir)
    inv_freq, scale = model.model.inv_freq, model.model.rope_scaling
    errors = []
    for mode, prefix_lens, lens in STEPS:  # the later steps read what the earlier left
        batch = kit._make_forward_batch(case(mode, prefix_lens, lens), runner, max_context_len=64, device="cpu")
        rows = torch.cat([hidden[n][p : p + q] for n, (p, q) in enumerate(zip(prefix_lens, lens, strict=True))])
        positions = torch.cat([torch.arange(p, p + q) for p, q in zip(prefix_lens, lens, strict=True)])
        cos, sin = rotary_cos_sin(positions, inv_freq, scale, torch.float32)
        with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
            backend.init_forward_metadata(batch)
            out = layer(rows, cos, sin, batch)
        expected = torch.cat([want[n][p : p + q] for n, (p, q) in enumerate(zip(prefix_lens, lens, strict=True))])
        errors.append((out - expected).abs().max().item() / expected.abs().max().item())
    return errors


@pytest.fixture(scope="session")
def layer_errors(lightning_kit):
    """`layer_errors(tiny_dir, tp_size=1)`: `linear_layer_errors` with the kit (importlib import mode keeps conftest
    out of test modules' namespace)."""
    return lambda tiny_dir, tp_size=1: linear_layer_errors(tiny_dir, lightning_kit, tp_size)
