"""Aligned mode on SGLang's layers, on the CPU: the dense and MoE layers, the LM head and the softmax attention over
SGLang's token pool compute the shim's aligned bits (the settings check is in test_registration.py; the linear
layers' aligned steps in test_backend.py). Bitwise equality of a whole served request needs a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("sglang")

from safetensors.torch import load_file  # noqa: E402


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def aligned_pair(request, sglang_world, tiny_dir, monkeypatch):
    """The SGLang model built in aligned mode with the tiny checkpoint loaded, and the shim on the same checkpoint, in
    one dtype (SGLang builds under `--dtype` as torch's default)."""
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    from common_kernels import RingLinearForCausalLM as Shim
    from common_kernels.ops.moe import aligned as moe_aligned
    from ring_linear_sglang.config import RingLinearSGLangConfig
    from ring_linear_sglang.model import RingLinearForCausalLM

    monkeypatch.setenv("RING_LINEAR_ALIGNED", "1")
    monkeypatch.setattr(moe_aligned, "_warm_up_max_tokens", None)  # the model sets it: put back after the test
    with set_default_torch_dtype(request.param):
        model = RingLinearForCausalLM(config=RingLinearSGLangConfig.from_pretrained(tiny_dir))
    weights = {}
    for path in sorted(tiny_dir.glob("*.safetensors")):
        weights |= load_file(path)
    model.load_weights(weights.items())
    return model, Shim.from_pretrained(tiny_dir, dtype=request.param)


def _randn(*shape: int, seed: int, like: nn.Module) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(like.dtype)


def test_the_first_forward_compiles_every_expert_tier_a_prompt_can_take(aligned_pair):
    """Aligned mode prefills a prompt in one step on SGLang, so any tier up to the context length may run."""
    from common_kernels.ops.moe import aligned as moe_aligned

    model, _ = aligned_pair
    assert moe_aligned._warm_up_max_tokens == model.config.max_position_embeddings


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_the_mlp_layers_equal_the_shims_bit_for_bit(aligned_pair, kind):
    model, shim = aligned_pair
    index = next(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate") == (kind == "moe"))
    engine_mlp = model.model.layers[index].mlp
    assert engine_mlp.aligned
    x = _randn(37, model.config.hidden_size, seed=13, like=shim)
    with torch.no_grad():
        engine, alone = engine_mlp(x), engine_mlp(x[20:21])
        want = shim.model.layers[index].mlp(x, aligned=True)
    assert torch.equal(engine, want) and torch.equal(alone[0], engine[20])


def test_the_lm_head_is_the_shims_aligned_gemm_through_sglangs_quant_method_hook(aligned_pair):
    from sglang.srt.layers import logits_processor

    model, shim = aligned_pair
    head = model.aligned_lm_head
    if hasattr(logits_processor, "should_apply_lm_head_quant_method"):  # 0.5.17's hook; later releases inline it
        assert logits_processor.should_apply_lm_head_quant_method(head, head.quant_method)
    assert head.weight is model.lm_head.weight  # the loaded parameter itself, not a copy
    # the shim's dtype: the aligned GEMM takes another kernel for an fp32 weight (a bf16 model's fp32 head, default
    # mode's, gave every logprob other bits on the GPU)
    assert head.weight.dtype == shim.lm_head.weight.dtype
    h = _randn(5, model.config.hidden_size, seed=4, like=shim)
    with torch.no_grad():
        assert torch.equal(head.quant_method.apply(head, h), shim.logits(h, aligned=True))


def test_every_projection_is_the_shims_aligned_gemm(aligned_pair):
    """Each layer's QKV, gate and output projection through SGLang's own layer call: the shim's
    `Projection(aligned=True)` bit for bit."""
    from common_kernels.serving.projections import AlignedProjection

    model, shim = aligned_pair
    pairs = [
        (getattr(layer.attention, name), getattr(mine.attention, name))
        for layer, mine in zip(model.model.layers, shim.model.layers, strict=True)
        for name in ("query_key_value", "g_proj", "dense")
        if hasattr(layer.attention, name)
    ]
    assert pairs and all(isinstance(engine.quant_method, AlignedProjection) for engine, _ in pairs)
    for engine, mine in pairs:
        x = _randn(6, engine.weight.shape[1], seed=8, like=shim)
        with torch.no_grad():
            assert torch.equal(engine(x)[0], mine(x, aligned=True))


class _TokenPool:
    """SGLang's token-to-KV pool as the attention reads it: per layer `[rows, kv_heads, d]`, written at locations."""

    def __init__(self, rows: int, kv_heads: int, d: int, dtype: torch.dtype) -> None:
        self.k, self.v = (torch.full((rows, kv_heads, d), float("nan"), dtype=dtype) for _ in range(2))

    def set_kv_buffer(self, layer, loc, k, v) -> None:
        self.k[loc], self.v[loc] = k, v

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


def test_softmax_attention_over_sglangs_token_pool_is_the_shims_kernel(aligned_pair, monkeypatch):
    """An extend (a fresh prompt beside a continued one) and then a decode, with each request's tokens scattered over
    the pool: every row equals the shim's packed call over the whole sequences."""
    from sglang.srt.model_executor import forward_context

    from common_kernels.ops.attention.aligned import causal_attention_aligned
    from ring_linear_sglang import aligned

    model, shim = aligned_pair
    attn = next(layer.attention.attn for layer in model.model.layers if hasattr(layer.attention, "aligned"))
    Hq, Hkv, d = attn.tp_q_head_num, attn.tp_k_head_num, attn.head_dim
    lengths = [9, 21]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(lengths), h, d, generator=g).to(shim.dtype) for h in (Hq, Hkv, Hkv))
    starts = [0, lengths[0]]
    want = causal_attention_aligned(q, k, v, torch.tensor([0, 9, 30]), attn.scaling, max(lengths))
    pool, req_to_token = _TokenPool(64, Hkv, d, shim.dtype), torch.zeros((4, 40), dtype=torch.int32)
    rows = torch.randperm(63, generator=g)[: sum(lengths)] + 1  # row 0 is SGLang's padding sink
    req_to_token[2, : lengths[0]], req_to_token[1, : lengths[1]] = rows[: lengths[0]], rows[lengths[0] :]
    monkeypatch.setattr(forward_context, "get_token_to_kv_pool", lambda: pool)
    monkeypatch.setattr(forward_context, "get_req_to_token_pool", lambda: SimpleNamespace(req_to_token=req_to_token))
    pool.set_kv_buffer(attn, rows[lengths[0] : lengths[0] + 15], k[9:24], v[9:24])  # request 1's cached prefix
    extend = SimpleNamespace(
        forward_mode=SimpleNamespace(is_decode_or_idle=lambda: False), req_pool_indices=torch.tensor([2, 1]),
        seq_lens=torch.tensor([8, 20]), extend_seq_lens=torch.tensor([8, 5], dtype=torch.int32),
        extend_seq_lens_cpu=[8, 5], out_cache_loc=torch.cat([rows[:8], rows[24:29]]),
    )  # fmt: skip
    new = torch.cat([torch.arange(0, 8), torch.arange(24, 29)])
    out = aligned.attend(attn, q[new].reshape(13, -1), k[new].reshape(13, -1), v[new].reshape(13, -1), extend)
    assert torch.equal(out.view(13, Hq, d), want[new])
    decode = SimpleNamespace(
        forward_mode=SimpleNamespace(is_decode_or_idle=lambda: True), req_pool_indices=torch.tensor([2, 1]),
        seq_lens=torch.tensor([9, 21]), out_cache_loc=torch.stack([rows[8], rows[29]]),
    )  # fmt: skip
    last = torch.tensor([starts[0] + 8, starts[1] + 20])
    out = aligned.attend(attn, q[last].reshape(2, -1), k[last].reshape(2, -1), v[last].reshape(2, -1), decode)
    assert torch.equal(out.view(2, Hq, d), want[last])
