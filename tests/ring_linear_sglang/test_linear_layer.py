"""The SGLang linear-attention layer (the model's module, our backend, SGLang's state pool and batches) against
the training shim's layer, over three steps that share the slots: fresh prefills, then continuing chunks
(one of a single token), then a decode. Triton interpreter on the CPU; the tiny checkpoint's layer 0."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

LENGTHS = (8, 5, 14)  # whole sequences
STEPS = [("extend", (0, 0, 0), (5, 3, 9)), ("extend", (5, 3, 9), (2, 1, 4)), ("decode", (7, 4, 13), (1, 1, 1))]


def _hidden() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(length, 64, generator=g) for length in LENGTHS]


def _shim_outputs(tiny_dir) -> list[torch.Tensor]:
    """Layer 0 of the shim (float references) over the whole sequences, from zero states."""
    from common_kernels import RingLinearForCausalLM
    from common_kernels.model.layers import ForwardContext
    from common_kernels.ops.rope.naive import rotary_cos_sin, rotary_inv_freq

    shim = RingLinearForCausalLM.from_pretrained(tiny_dir, use_triton=False)
    full = torch.cat(_hidden())
    positions = torch.cat([torch.arange(length) for length in LENGTHS])
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    cos, sin = rotary_cos_sin(positions, *rotary_inv_freq(shim.config), torch.float32)
    with torch.no_grad():
        out = shim.model.layers[0].attention(full, ForwardContext(cu, torch.tensor(cu), cos, sin, cache=None))
    return [out[a:b] for a, b in zip(cu[:-1], cu[1:], strict=True)]


def test_the_layer_over_three_steps_equals_the_shim(sglang_world, tiny_dir, lightning_kit, mock_backend):
    from safetensors.torch import load_file
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    from common_kernels.ops.rope.naive import rotary_cos_sin
    from ring_linear_sglang.config import RingLinearSGLangConfig
    from ring_linear_sglang.model import RingLinearForCausalLM

    kit = lightning_kit
    config = RingLinearSGLangConfig.from_pretrained(tiny_dir)
    model = RingLinearForCausalLM(config=config)
    model.load_weights(load_file(next(tiny_dir.glob("*.safetensors"))).items())
    layer = model.model.layers[0].attention
    H = config.num_attention_heads

    def case(mode, prefix_lens, extend_lens):
        forward_mode = ForwardMode.DECODE if mode == "decode" else ForwardMode.EXTEND
        return kit.LightningAttentionCase(
            name=f"ring_{mode}", backend="triton", forward_mode=forward_mode, num_heads=H, page_size=1,
            prefix_lens=prefix_lens, extend_lens=() if mode == "decode" else extend_lens,
        )  # fmt: skip

    runner, backend = mock_backend(case(*STEPS[0]), config)
    pool = runner.req_to_token_pool.mamba2_layer_cache(0).temporal
    pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(9)))  # stale memory everywhere
    hidden, want = _hidden(), _shim_outputs(tiny_dir)
    inv_freq, scale = model.model.inv_freq, model.model.rope_scaling
    for step, (mode, prefix_lens, lens) in enumerate(STEPS):  # the later steps read what the earlier left
        batch = kit._make_forward_batch(case(mode, prefix_lens, lens), runner, max_context_len=64, device="cpu")
        rows = torch.cat([hidden[n][p : p + q] for n, (p, q) in enumerate(zip(prefix_lens, lens, strict=True))])
        positions = torch.cat([torch.arange(p, p + q) for p, q in zip(prefix_lens, lens, strict=True)])
        cos, sin = rotary_cos_sin(positions, inv_freq, scale, torch.float32)
        with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
            backend.init_forward_metadata(batch)
            out = layer(rows, cos, sin, batch)
        expected = torch.cat([want[n][p : p + q] for n, (p, q) in enumerate(zip(prefix_lens, lens, strict=True))])
        err = (out - expected).abs().max().item()
        assert err < 1e-4 * expected.abs().max().item(), f"step {step} ({mode}): max abs error {err}"
