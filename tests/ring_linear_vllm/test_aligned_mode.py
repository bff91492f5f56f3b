"""Aligned mode's switches in vLLM (CPU): `RING_LINEAR_ALIGNED=1` brings vLLM's batch invariance, is refused with a
vLLM whose batch invariance was turned off (and the reverse), keeps chunked prefill and prefix caching, and makes
every step's linear attention aligned. Bitwise equality itself needs a GPU (`common_kernels` tests the kernels)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm")


@pytest.fixture
def aligned_env(monkeypatch):
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")


def test_register_turns_on_vllms_batch_invariance_with_aligned_mode(vllm_env, monkeypatch):
    from ring_linear_vllm import register

    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")  # restored (unset) after the test
    os.environ.pop("VLLM_BATCH_INVARIANT")
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "0")
    register()
    assert "VLLM_BATCH_INVARIANT" not in os.environ
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    register()
    assert os.environ["VLLM_BATCH_INVARIANT"] == "1"


def test_aligned_mode_without_vllms_batch_invariance_is_refused(vllm_tools, tiny_dir, monkeypatch):
    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    with pytest.raises(ValueError, match="RING_LINEAR_ALIGNED=1 needs VLLM_BATCH_INVARIANT=1"):
        vllm_tools.engine_config(tiny_dir)


def test_vllms_batch_invariance_without_aligned_mode_is_refused(vllm_tools, tiny_dir, monkeypatch):
    monkeypatch.delenv("RING_LINEAR_ALIGNED", raising=False)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    with pytest.raises(ValueError, match="VLLM_BATCH_INVARIANT=1 asks every layer.*set RING_LINEAR_ALIGNED=1 too"):
        vllm_tools.engine_config(tiny_dir)


def _builder(vllm_tools, tiny_dir, **engine_kwargs):
    cfg = vllm_tools.engine_config(tiny_dir, **engine_kwargs)
    model = vllm_tools.build_model(cfg)
    layer = model.model.layers[0].attention
    with vllm_tools.single_rank(cfg):
        backend = layer.get_attn_backend()
        return backend, backend.get_builder_cls()(
            layer.get_kv_cache_spec(cfg), [layer.prefix], cfg, layer.decay_rate.device
        )


def test_aligned_mode_keeps_chunked_prefill_and_prefix_caching(vllm_tools, tiny_dir, aligned_env, caplog, monkeypatch):
    """A token's bits do not depend on where a chunk or a cache hit split its prompt, so neither is turned off."""
    from ring_linear_vllm import engine_config

    monkeypatch.setattr(engine_config.vllm, "__version__", "0.26.0")  # where caching is served
    cfg = vllm_tools.engine_config(tiny_dir, enable_prefix_caching=True, enable_chunked_prefill=True)
    assert cfg.cache_config.enable_prefix_caching and cfg.scheduler_config.enable_chunked_prefill
    assert "turned off" not in caplog.text


def test_aligned_mode_names_its_product_setting_for_the_trainer(vllm_tools, tiny_dir, aligned_env, caplog, monkeypatch):
    """A trainer scoring under another `RING_LINEAR_FP32_DOT` would get close logprobs, not the engine's bits: the
    server says which setting it serves under."""
    import logging

    from common_kernels.ops import triton_settings

    monkeypatch.setattr(triton_settings, "FP32_DOT_PRECISION", "tf32x3")
    caplog.set_level(logging.INFO, logger="vllm.ring_linear_vllm.engine_config")
    vllm_tools.engine_config(tiny_dir)
    assert "multiplies fp32 operands as tf32x3 (RING_LINEAR_FP32_DOT)" in caplog.text


def test_aligned_mode_traces_without_inductor(vllm_tools, tiny_dir, aligned_env):
    """The graph is traced and split for CUDA graphs as before, its ops run as the shim runs them (no inductor
    kernels), and vLLM's own custom ops then take their CUDA forms, as in eager mode."""
    cfg = vllm_tools.engine_config(tiny_dir, enforce_eager=False)
    assert cfg.compilation_config.backend == "eager"
    assert "all" in cfg.compilation_config.custom_ops


def test_default_mode_compiles_with_inductor(vllm_tools, tiny_dir, monkeypatch):
    monkeypatch.delenv("RING_LINEAR_ALIGNED", raising=False)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    assert vllm_tools.engine_config(tiny_dir, enforce_eager=False).compilation_config.backend == "inductor"


def test_aligned_mode_runs_every_step_aligned_and_declares_batch_invariance(vllm_tools, tiny_dir, aligned_env):
    backend, builder = _builder(vllm_tools, tiny_dir, enable_chunked_prefill=True)
    assert backend.supports_batch_invariance()
    meta = builder.build(0, vllm_tools.common_metadata([1, 7, 6], [10, 7, 20], [5, 3, 0], builder.device))
    assert meta.step.aligned and meta.step.prefill_plan is None  # token by token: no segment plan


def test_without_aligned_mode_the_steps_are_the_default_ones(vllm_tools, tiny_dir, monkeypatch):
    monkeypatch.delenv("RING_LINEAR_ALIGNED", raising=False)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    backend, builder = _builder(vllm_tools, tiny_dir)
    assert not backend.supports_batch_invariance()
    meta = builder.build(0, vllm_tools.common_metadata([1, 7, 6], [10, 7, 20], [5, 3, 0], builder.device))
    assert not meta.step.aligned and meta.step.prefill_plan is not None


def _gates(model) -> list:
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


def _softmax_attention(model) -> list:
    return [layer.attention.attn for layer in model.model.layers if hasattr(layer.attention, "attn")]


def test_aligned_mode_routes_with_the_invariant_gemm_and_attends_with_the_shims_kernel(
    vllm_tools, tiny_dir, aligned_env, monkeypatch
):
    """cuBLAS's router GEMM and FlashAttention 3 choose kernels by the batch; aligned mode takes neither."""
    from common_kernels.ops.moe import aligned as moe_aligned
    from ring_linear_vllm.aligned_attention import RingAlignedAttentionBackend, RingAlignedAttentionImpl

    monkeypatch.setattr(moe_aligned, "_warm_up_max_tokens", None)
    vllm_config = vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False)
    model = vllm_tools.build_model(vllm_config)
    # the profiling forward then compiles every expert tier a step of vLLM's budget can take
    assert moe_aligned._warm_up_max_tokens == vllm_config.scheduler_config.max_num_batched_tokens
    gates, attention = _gates(model), _softmax_attention(model)
    assert gates and all(gate.invariant for gate in gates)
    assert attention and all(a.attn_backend is RingAlignedAttentionBackend for a in attention)
    assert all(isinstance(a.impl, RingAlignedAttentionImpl) for a in attention)


def test_aligned_mode_names_a_chosen_attention_backend_as_unused(vllm_tools, tiny_dir, aligned_env, caplog):
    cfg = vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False, attention_backend="TRITON_ATTN")
    assert "--attention-backend TRITON_ATTN is not used" in caplog.text
    from ring_linear_vllm.aligned_attention import RingAlignedAttentionBackend

    assert all(a.attn_backend is RingAlignedAttentionBackend for a in _softmax_attention(vllm_tools.build_model(cfg)))


def test_the_engines_aligned_attention_over_its_paged_cache_is_the_shims_bit_for_bit(vllm_tools, tiny_dir, aligned_env):
    """The engine layer's forward on vLLM's Triton KV-cache layout (pages shuffled; a step of two decodes and one
    prefill after a cached prefix) against the shim's call on the packed sequences."""
    from types import SimpleNamespace

    from common_kernels.ops.attention.aligned import causal_attention_aligned

    cfg = vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False)
    attn = _softmax_attention(vllm_tools.build_model(cfg))[0]
    impl, H, Hkv, d, page = attn.impl, attn.num_heads, attn.num_kv_heads, attn.head_size, 16
    lengths, new = [5, 40, 23], [1, 1, 7]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), h, d, generator=g) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0, 5, 45, 68])
    kv_cache = torch.randn(12, Hkv, page, 2 * d, generator=g)  # the Triton backend's logical layout
    key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)
    table = torch.tensor([[7, 0, 0], [2, 11, 4], [9, 1, 0]], dtype=torch.int32)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        for p in range(a, b):
            key_cache[table[s, (p - a) // page], (p - a) % page] = k[p]
            value_cache[table[s, (p - a) // page], (p - a) % page] = v[p]
    rows = torch.cat([torch.arange(e - n, e) for e, n in zip(cu[1:].tolist(), new, strict=True)])
    metadata = SimpleNamespace(
        num_actual_tokens=len(rows), query_start_loc=torch.tensor([0, 1, 2, 9], dtype=torch.int32),
        seq_lens=torch.tensor(lengths, dtype=torch.int32), block_table=table, max_query_len=7,
    )  # fmt: skip
    output = torch.zeros(len(rows) + 3, H * d)  # an engine's padded buffer
    impl.forward(attn, q[rows].reshape(len(rows), -1), None, None, kv_cache, metadata, output)
    want = causal_attention_aligned(q, k, v, cu, impl.scale, max(lengths))[rows]
    assert torch.equal(output[: len(rows)].view(-1, H, d), want)
    assert (output[len(rows) :] == 0).all()


def test_default_mode_keeps_the_plain_router_and_vllms_attention_choice(vllm_tools, tiny_dir, monkeypatch):
    monkeypatch.delenv("RING_LINEAR_ALIGNED", raising=False)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    cfg = vllm_tools.engine_config(tiny_dir)
    assert cfg.attention_config.backend is None
    model = vllm_tools.build_model(cfg)
    gates = _gates(model)
    assert gates and not any(gate.invariant for gate in gates)
    from ring_linear_vllm.aligned_attention import RingAlignedAttentionBackend

    assert not any(a.attn_backend is RingAlignedAttentionBackend for a in _softmax_attention(model))
    from common_kernels.serving.projections import AlignedProjection

    methods = [m.quant_method for m in model.modules() if hasattr(m, "quant_method")]
    assert methods and not any(isinstance(method, AlignedProjection) for method in methods)


def test_aligned_mode_norms_and_softmax_qk_run_the_shims_kernels(vllm_tools, tiny_dir, aligned_env, monkeypatch):
    """The RMSNorms through aligned mode's kernel, and a softmax layer's q and k through the shim's qk-norm/RoPE
    kernel (one launch over both), bit for bit what the shim's Triton path gives on the same projection."""
    from common_kernels.model import layers as shim_layers
    from common_kernels.ops.rope.fused import qk_norm_rope_triton

    cfg = vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False)
    model = vllm_tools.build_model(cfg)
    assert model.model.aligned and all(layer.aligned for layer in model.model.layers)
    normed = []
    monkeypatch.setattr(shim_layers, "rms_norm_aligned", lambda *a: normed.append(1) or shim_layers.rms_norm(*a))
    layer = next(layer for layer in model.model.layers if not layer.is_linear)
    softmax = layer.attention
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():  # constructed, not loaded: give the weights this test reads some values
        for weight in [layer.input_layernorm.weight, *softmax.parameters()]:
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3 + (weight.dim() == 1))
    seen = {}
    monkeypatch.setattr(softmax.attn, "forward", lambda q, k, v: seen.update(q=q, k=k) or torch.zeros_like(q))
    T, H, Hkv, d = 5, softmax.num_heads, softmax.num_kv_heads, softmax.head_dim
    a = torch.randn(T, model.config.hidden_size, generator=torch.Generator().manual_seed(12))
    cos, sin = model.model.rope_cos[:T], model.model.rope_sin[:T]
    with vllm_tools.single_rank(cfg), torch.no_grad():
        layer.input_layernorm(a, a.dtype, layer.aligned)
        softmax(a, cos, sin)
        qkv, _ = softmax.query_key_value(a)
    assert normed == [1]
    q, k, _ = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
    weights = softmax.query_layernorm.weight, softmax.key_layernorm.weight
    want_q, want_k = qk_norm_rope_triton(q.view(T, H, d), k.view(T, Hkv, d), *weights, cos, sin, softmax.eps)
    assert torch.equal(seen["q"].reshape(T, H, d), want_q) and torch.equal(seen["k"].reshape(T, Hkv, d), want_k)


def test_without_aligned_mode_the_engine_keeps_the_compiled_norms(vllm_tools, tiny_dir, monkeypatch):
    monkeypatch.delenv("RING_LINEAR_ALIGNED", raising=False)
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    model = vllm_tools.build_model(vllm_tools.engine_config(tiny_dir))
    assert not model.model.aligned and not any(layer.aligned for layer in model.model.layers)
    assert not any(layer.attention.aligned for layer in model.model.layers if not layer.is_linear)


@pytest.mark.parametrize("kind", ["moe", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_mlp_layers_equal_the_shims_bit_for_bit(vllm_tools, tiny_dir, aligned_env, dtype, kind):
    """An MoE layer (router, routed experts, shared expert) and a dense SwiGLU layer on the engine's loaded weights
    against the shim's `forward(aligned=True)` on the checkpoint: the same bits, in fp32 and bf16."""
    from vllm.utils.torch_utils import set_default_torch_dtype

    from common_kernels import RingLinearForCausalLM

    cfg = vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False, dtype=str(dtype).removeprefix("torch."))
    with set_default_torch_dtype(dtype):  # as vLLM's loader builds a model: parameters in the serving dtype
        model = vllm_tools.build_model(cfg)
    shim = RingLinearForCausalLM.from_pretrained(tiny_dir).to(dtype)
    index = next(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate") == (kind == "moe"))
    engine_mlp, shim_mlp = model.model.layers[index].mlp, shim.model.layers[index].mlp
    assert engine_mlp.aligned and (kind == "dense" or shim_mlp.gate.weight.dtype == torch.float32)
    x = torch.randn(37, model.config.hidden_size, generator=torch.Generator().manual_seed(13)).to(dtype)
    device = next(engine_mlp.parameters()).device
    with vllm_tools.single_rank(cfg), torch.no_grad():
        model.load_weights(shim.state_dict().items())
        engine = engine_mlp(x.to(device)).cpu()
        alone = engine_mlp(x[20:21].to(device)).cpu()
    with torch.no_grad():
        want = shim_mlp(x, aligned=True)
    assert engine.dtype == dtype and torch.equal(engine, want)
    assert torch.equal(alone[0], engine[20])


@pytest.mark.parametrize(
    "flag",
    [
        {"tensor_parallel_size": 2},
        {"enable_expert_parallel": True},
        {"kv_cache_dtype": "fp8"},
        {"data_parallel_size": 2},
    ],
)
def test_aligned_mode_refuses_sharded_experts_and_a_quantized_kv_cache(vllm_tools, tiny_dir, aligned_env, flag):
    with pytest.raises(ValueError, match="RING_LINEAR_ALIGNED=1 serves each layer unsharded and unquantized"):
        vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False, **flag)


def test_aligned_moe_layer_traces_under_torch_compile(vllm_tools, tiny_dir, aligned_env):
    """vLLM compiles the model: the aligned MoE layer must trace (custom ops' fake shapes, the weight lookup) with
    a dynamic token count, and give eager's bits."""
    cfg = vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False)
    model = vllm_tools.build_model(cfg)
    index = next(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate"))
    moe = model.model.layers[index].mlp
    with torch.no_grad():
        for name, param in moe.named_parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    compiled = torch.compile(moe, backend="aot_eager", dynamic=True, fullgraph=True)
    with vllm_tools.single_rank(cfg), torch.no_grad():
        for tokens in (3, 17):
            x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
            x = x.to(moe.gate.weight.device)
            assert torch.equal(compiled(x), moe(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_lm_head_is_the_shims_fixed_tile_gemm(vllm_tools, tiny_dir, aligned_env, dtype):
    """The engine's logits in aligned mode: the shim's `logits(aligned=True)`, bit for bit, cut to the vocabulary."""
    from common_kernels.ops.moe.router_gemm import router_logits

    cfg = vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False, dtype=str(dtype).removeprefix("torch."))
    model = vllm_tools.build_model(cfg)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)))
        h = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(4)).to(dtype)
        logits = model.compute_logits(h)
        want = router_logits(h, model.lm_head.weight[: model.config.vocab_size], invariant=True)
    assert logits.shape == (9, model.config.vocab_size) and logits.dtype == torch.float32
    assert torch.equal(logits, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_projections_are_the_shims_gemm(vllm_tools, tiny_dir, aligned_env, dtype):
    """Every QKV, gate and output projection runs `aligned_linear` (the shim's `Projection(aligned=True)`), bit for
    bit, through vLLM's own layer call (default mode keeps vLLM's method: the test above)."""
    from common_kernels.ops.moe.router_gemm import aligned_linear
    from common_kernels.serving.projections import AlignedProjection

    cfg = vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False, dtype=str(dtype).removeprefix("torch."))
    model = vllm_tools.build_model(cfg)
    names = ("query_key_value", "g_proj", "dense")
    layers = [getattr(layer.attention, name) for layer in model.model.layers for name in names
              if hasattr(layer.attention, name)]  # fmt: skip
    assert len(layers) == sum(3 if hasattr(layer.attention, "g_proj") else 2 for layer in model.model.layers)
    assert all(isinstance(layer.quant_method, AlignedProjection) for layer in layers)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, layers[0].weight.shape[1], generator=g).to(dtype)
    with torch.no_grad():  # the built model's weights are uninitialised memory (NaN compares unequal)
        layers[0].weight.copy_(torch.randn(layers[0].weight.shape, generator=g) * 0.1)
        out, _ = layers[0](x.to(layers[0].weight.device))
    assert torch.equal(out.cpu(), aligned_linear(x, layers[0].weight.cpu()))


def test_aligned_mode_declares_the_window_buffers_with_the_state(vllm_tools, tiny_dir, aligned_env):
    """Three fp32 state tensors a layer (the state, the window's keys and values), each copied with its slot."""
    from common_kernels.ops.linear_attn.windowed import WINDOW
    from ring_linear_vllm.linear_attention import linear_state_copy_funcs

    model = vllm_tools.build_model(vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False))
    layer = next(layer.attention for layer in model.model.layers if hasattr(layer.attention, "g_proj"))
    (H, K, V), window_k, window_v = layer.get_state_shape()
    assert window_k == (H, WINDOW, K) and window_v == (H, WINDOW, V)
    assert layer.get_state_dtype() == (torch.float32,) * 3 and len(linear_state_copy_funcs()) == 3


def test_aligned_mode_refuses_a_bf16_state_naming_the_flag(aligned_env):
    from types import SimpleNamespace

    from ring_linear_vllm.engine_config import state_dtypes

    with pytest.raises(ValueError, match="keeps the linear state in float32; drop --mamba-ssm-cache-dtype bfloat16"):
        state_dtypes(SimpleNamespace(mamba_ssm_cache_dtype="bfloat16", mamba_cache_dtype="auto"))


def test_an_aligned_mixed_step_matches_the_shim(vllm_tools, tiny_dir, aligned_env):
    """The mixed step (a chunked prefill, decodes, a one-token prompt, stale slots and windows) through vLLM's
    builder and the layer's three state tensors, in the window form: the shim's function to rounding."""
    got, want = vllm_tools.mixed_step_output(tiny_dir), vllm_tools.mixed_step_reference(tiny_dir)
    err = (got - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), f"max abs error {err}"


def test_the_profiling_forward_compiles_both_page_variants_of_the_aligned_attention(
    vllm_tools, tiny_dir, aligned_env, monkeypatch
):
    """vLLM's profiling run has no metadata: the layer launches its kernel on a one-page cache of its own layout,
    once with pages that hold whole key tiles (the kernel's variant for a hybrid model's large blocks) and once with
    pages that do not, so either serving variant is compiled before the first request; it returns zeros."""
    from common_kernels.ops.attention.aligned import BLOCK_N
    from ring_linear_vllm import aligned_attention

    launches = []  # each launch's page size
    real = aligned_attention.paged_attention_aligned
    monkeypatch.setattr(
        aligned_attention, "paged_attention_aligned", lambda *a, **k: launches.append(a[1].shape[1]) or real(*a, **k)
    )
    attn = _softmax_attention(vllm_tools.build_model(vllm_tools.engine_config(tiny_dir, enable_chunked_prefill=False)))[
        0
    ]
    output = torch.ones(3, attn.num_heads * attn.head_size)
    query = torch.randn(3, attn.num_heads * attn.head_size)
    assert attn.impl.forward(attn, query, None, None, torch.tensor([]), None, output) is output
    assert sorted(page % BLOCK_N == 0 for page in launches) == [False, True] and (output == 0).all()
