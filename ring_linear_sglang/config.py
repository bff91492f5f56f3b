"""`RingLinearConfig` with what SGLang's hybrid machinery reads from a linear-attention model's config.

SGLang sizes its state pool (`MambaPool`) from `mamba2_cache_params`, builds its softmax KV pool for
`full_attention_layer_ids` only, and routes the other layers to the registered linear-attention backend. The
class must not derive from SGLang's `BailingHybridConfig`, which would route to SGLang's own Lightning backend.
"""

from __future__ import annotations

import torch

from common_kernels.config import RingLinearConfig
from common_kernels.ops.linear_attn.windowed import WINDOW
from common_kernels.serving import aligned_mode, linear_state_shape

FULL_ATTENTION, LINEAR_ATTENTION = "attention", "linear_attention"  # SGLang's HybridLayerType values


class RingLinearSGLangConfig(RingLinearConfig):
    """The same fields and validation as `RingLinearConfig`; SGLang parses `config.json` into this class."""

    def __init__(self, **kwargs) -> None:
        # transformers gives a config subclass without its own __init__ a generated one, which would skip
        # RingLinearConfig's: defaults for fields the file leaves out, and the validation
        super().__init__(**kwargs)

    @property
    def layers_block_type(self) -> list[str]:
        return [FULL_ATTENTION if self.is_softmax_layer(l) else LINEAR_ATTENTION for l in range(self.num_hidden_layers)]

    @property
    def linear_layer_ids(self) -> list[int]:
        return [l for l in range(self.num_hidden_layers) if not self.is_softmax_layer(l)]

    @property
    def full_attention_layer_ids(self) -> list[int]:
        return [l for l in range(self.num_hidden_layers) if self.is_softmax_layer(l)]

    @property
    def mamba2_cache_params(self):
        """One `[H / attn_tp, d_k, d_v]` state per request and linear layer. Its dtype is SGLang's `--mamba-ssm-dtype`
        (fp32 unless set; the launcher check refuses what our kernels do not keep). No conv state, except in aligned
        mode, whose window buffer (the keys and values since the state's last grid point) rides in SGLang's conv
        state: fp32 `[H / attn_tp * (d_k + d_v), WINDOW]` per slot, which SGLang sizes, clears and copies with the
        slot (`backend.window_buffers` reads it as `[slots, H, WINDOW, d_k]` keys and `[slots, H, WINDOW, d_v]`
        values)."""
        from sglang.srt.configs.mamba_utils import (
            Mamba2CacheParams,
            Mamba2StateDType,
            Mamba2StateShape,
            mamba2_state_dtype,
        )
        from sglang.srt.runtime_context import get_parallel

        tp_size = get_parallel().attn_tp_size
        heads, d_k, d_v = linear_state_shape(self, 1)
        window = aligned_mode()
        shape = Mamba2StateShape.create(
            tp_world_size=tp_size, intermediate_size=heads * (d_k + d_v) if window else 0, n_groups=0,
            num_heads=heads, head_dim=d_k, state_size=d_v, conv_kernel=WINDOW + 1 if window else 1,
        )  # fmt: skip
        if not window:
            return Mamba2CacheParams(shape=shape, layers=self.linear_layer_ids)
        dtype = Mamba2StateDType(conv=torch.float32, temporal=mamba2_state_dtype(self).temporal)
        return Mamba2CacheParams(shape=shape, layers=self.linear_layer_ids, dtype=dtype)
