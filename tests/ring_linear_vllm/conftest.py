"""Fixtures for the vLLM adapter tests (they need `pip install -e .[vllm]`; CI runs them in a second venv).

Without a GPU, `vllm_env` installs a minimal CPU platform (`ring_linear_vllm.testing`); no forward pass runs on it.
With a GPU the real platform is used and models are built on the GPU.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from common_kernels import RingLinearConfig, RingLinearForCausalLM, tiny_config
from ring_linear_vllm.testing import install_cpu_platform

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# the GPU tests import the runs they share (vllm_runs.py) by name; importlib import mode leaves this folder off
# the path
sys.path.insert(0, str(Path(__file__).parent))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def vllm_logs_reach_caplog(monkeypatch):
    """vLLM's logging config stops records at the `vllm` logger (propagation off), and ours live under it
    (`vllm.ring_linear_vllm.engine_config`): let them reach pytest's root handler, so `caplog` reads them."""
    import logging

    monkeypatch.setattr(logging.getLogger("vllm"), "propagate", True)


@pytest.fixture(scope="session")
def vllm_env():
    """vLLM imported, a platform in place, and the plugins loaded as every vLLM process loads them."""
    pytest.importorskip("vllm")
    if DEVICE == "cpu":
        install_cpu_platform()
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
        "enable_prefix_caching": False,  # vLLM 0.33 turns it on for hybrids; tests that want it ask
    } | engine_kwargs
    return EngineArgs(**kwargs).create_engine_config()


@contextmanager
def single_rank(vllm_config, tp_size: int = 1, pp_size: int = 1, rank: int = 0, port: int | None = None):
    """A process group (1 rank, or rank `rank` of `tp_size * pp_size` over TCP `port`) and `vllm_config` as the
    current config, as model construction needs. The group lives for the rest of the process."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    with set_current_vllm_config(vllm_config):
        if not ps.model_parallel_is_initialized():
            port = port or 29500 + os.getpid() % 1000
            backend = "nccl" if DEVICE == "cuda" else "gloo"
            ps.init_distributed_environment(
                world_size=tp_size * pp_size,
                rank=rank,
                local_rank=rank,
                distributed_init_method=f"tcp://127.0.0.1:{port}",
                backend=backend,
            )
            ps.initialize_model_parallel(tp_size, pp_size)
        yield


def build_model(vllm_config, **group):
    """The plugin's model, constructed (uninitialised weights) on this machine's device."""
    from ring_linear_vllm.model import RingLinearForCausalLM as VllmModel

    with single_rank(vllm_config, **group), torch.device(DEVICE):
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
        mixed_step_output=mixed_step_output,
        mixed_step_reference=mixed_step_reference,
        run_two_ranks=run_two_ranks,
        write_mha_equivalent=write_mha_equivalent,
    )


MIXED_LAYER = 1  # a linear layer (an MoE MLP follows); its slot pool starts with stale values in every slot
STEP1 = [("A", 0, 5), ("D", 0, 9)]  # two fresh prefills
STEP2 = [("A", 5, 6), ("B", 0, 1), ("C", 0, 7), ("D", 9, 15)]  # decode, 1-token prompt, new prompt, 2nd chunk
LENGTHS = {"A": 6, "B": 1, "C": 7, "D": 15}
SLOTS = {"A": 5, "B": 2, "C": 3, "D": 0}


def mixed_step_output(model_dir, layer_ids: tuple[int, ...] = (MIXED_LAYER,), **group) -> torch.Tensor:
    """The vLLM linear layers' outputs for STEP2 after STEP1 (`[layers, STEP2 rows, D]`), on CPU.

    Every layer reads the same hidden rows and, as in vLLM, the step's one metadata object and the model's
    one RoPE table. `layer_forward(layer, rows, cos, sin)` replaces the layer's own forward (the unsplit
    composition of the equivalence test)."""
    from vllm.forward_context import set_forward_context

    from common_kernels import RingLinearForCausalLM

    layer_forward = group.pop("layer_forward", None)

    cfg = make_engine_config(model_dir)
    cfg.parallel_config.tensor_parallel_size = group.get("tp_size", 1)
    model = build_model(cfg, **group)
    shim = RingLinearForCausalLM.from_pretrained(model_dir)
    layers = [model.model.layers[i].attention for i in layer_ids]
    device = layers[0].decay_rate.device
    hidden = _mixed_hidden(device)
    with single_rank(cfg, **group):
        model.load_weights(shim.state_dict().items())
        generator = torch.Generator().manual_seed(7 + group.get("rank", 0))  # stale and different per rank
        owners = [layer for layer in linear_layers(model) if layer.get_kv_cache_spec(cfg) is not None]
        for layer in owners:
            # each cache entry's state (and, in aligned mode, window buffers), as vLLM hands them over
            layer.kv_cache = tuple(
                torch.randn(8, *shape, generator=generator).to(device) for shape in layer.get_state_shape()
            )
        builder_cls = layers[0].get_attn_backend().get_builder_cls()
        builder = builder_cls(owners[0].get_kv_cache_spec(cfg), [layer.prefix for layer in owners], cfg, device)
        for step, seq_lens in ((STEP1, [5, 9]), (STEP2, [6, 1, 7, 15])):
            rows = torch.cat([hidden[n][a:b] for n, a, b in step])
            positions = torch.cat([torch.arange(a, b, device=device) for _, a, b in step])
            query_lens = [b - a for _, a, b in step]
            slots = [SLOTS[n] for n, _, _ in step]
            metadata = builder.build(0, common_metadata(query_lens, seq_lens, slots, device))
            cos, sin = model.model.rope_cos[positions], model.model.rope_sin[positions]
            # vLLM builds metadata for the layers with a cache spec: each layer finds it under its entry's name
            with set_forward_context({layer.prefix: metadata for layer in owners}, cfg):
                outputs = [(layer_forward or type(layer).forward)(layer, rows, cos, sin) for layer in layers]
    return torch.stack(outputs).cpu()


def linear_layers(model) -> list:
    return [layer.attention for layer in model.model.layers if getattr(layer, "is_linear", False)]


def mixed_step_reference(model_dir, layer_ids: tuple[int, ...] = (MIXED_LAYER,)) -> torch.Tensor:
    """The training shim's same layers over the whole sequences from zero states, STEP2's rows."""
    from common_kernels import RingLinearForCausalLM
    from common_kernels.model.layers import ForwardContext
    from common_kernels.ops.rope.naive import rotary_cos_sin, rotary_inv_freq

    shim = RingLinearForCausalLM.from_pretrained(model_dir, use_triton=False)  # the float references
    hidden = _mixed_hidden("cpu")
    full = torch.cat([hidden[n] for n in LENGTHS])
    positions = torch.cat([torch.arange(L) for L in LENGTHS.values()])
    cu = [0, *torch.tensor(list(LENGTHS.values())).cumsum(0).tolist()]
    cos, sin = rotary_cos_sin(positions, *rotary_inv_freq(shim.config), torch.float32)
    start = dict(zip(LENGTHS, cu[:-1], strict=True))
    outputs = []
    for i in layer_ids:
        with torch.no_grad():
            out = shim.model.layers[i].attention(full, ForwardContext(cu, torch.tensor(cu), cos, sin, cache=None))
        outputs.append(torch.cat([out[start[n] + a : start[n] + b] for n, a, b in STEP2]))
    return torch.stack(outputs)


def _mixed_hidden(device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {n: torch.randn(L, 64, generator=generator).to(device) for n, L in LENGTHS.items()}


def pipeline_stage_load(model_dir, **group) -> dict[str, list[str]]:
    """Build this pipeline stage's model and load the whole checkpoint into it: what it holds and loads."""
    from safetensors.torch import load_file

    cfg = make_engine_config(model_dir)
    cfg.parallel_config.pipeline_parallel_size = group.get("pp_size", 1)
    model = build_model(cfg, **group)
    with single_rank(cfg, **group):
        loaded = model.load_weights(load_file(Path(model_dir) / "model.safetensors").items())
    return {
        "params": sorted(name for name, _ in model.named_parameters()),
        "loaded": sorted(loaded),
        "layers": [model.model.start_layer, model.model.end_layer],
    }


def run_two_ranks(mode: str, model_dir, out_dir) -> list[Path]:
    """Run `tp_worker.py` as ranks 0 and 1 of a gloo group; returns their output files."""
    from common_kernels.testing import run_ranks

    return run_ranks(Path(__file__).with_name("tp_worker.py"), [mode, model_dir], out_dir, timeout_s=600)


def write_mha_equivalent(src: Path, dst: Path) -> Path:
    """Copy a checkpoint with every KV head of the softmax layers repeated for each query head it serves.

    The model computes the same function (query head i read KV head i // group before, KV head i now), but
    each rank holds `group` times more KV values: the tiny model's 1 x 16 at TP 2 is too few for vLLM's CUDA
    KV-cache write (`ring_linear_vllm.compat.check_kv_cache_write_width`).
    """
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    H, Hkv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    group = H // Hkv
    softmax_layers = RingLinearConfig(**config).softmax_layer_ids
    dst.mkdir(parents=True, exist_ok=True)
    total_bytes = 0
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, dst / file.name)
            continue
        tensors = load_file(file)
        for i in softmax_layers:
            name = f"model.layers.{i}.attention.query_key_value.weight"
            if name in tensors:
                q, k, v = tensors[name].split([H * d, Hkv * d, Hkv * d])
                repeat = [x.unflatten(0, (Hkv, d)).repeat_interleave(group, dim=0).flatten(0, 1) for x in (k, v)]
                tensors[name] = torch.cat([q, *repeat]).contiguous()
        save_file(tensors, dst / file.name, metadata={"format": "pt"})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    config["num_key_value_heads"] = H
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    index_file = dst / "model.safetensors.index.json"
    if index_file.exists():  # its total size grew with the repeated heads
        index = json.loads(index_file.read_text())
        index.setdefault("metadata", {})["total_size"] = total_bytes
        index_file.write_text(json.dumps(index, indent=2))
    return dst


@pytest.fixture
def exact_fp32_products(monkeypatch):
    """Our kernels multiply fp32 exactly (`RING_LINEAR_FP32_DOT=ieee`) in the engines a test starts: comparisons of
    one request split two ways then differ only by summation order (`vllm_runs.SPLIT_BOUNDS` says why)."""
    monkeypatch.setenv("RING_LINEAR_FP32_DOT", "ieee")
