"""Ring-linear's linear-attention layer as a vLLM hybrid-state (`MambaBase`) layer.

vLLM's parallel linears do the projections; every step after the QKV GEMM is a `common_kernels` call,
the same code the training shim runs: fused qk-RMSNorm + partial RoPE, varlen prefill and in-place decode
on the fp32 state pool (one slot per request, read from the metadata), fused group-RMSNorm + sigmoid gate.
The layer runs behind vLLM's opaque `vllm::linear_attention` op, so torch.compile splits the graph around
it and full CUDA graphs capture its decode path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.abstract import MambaBase

# Importing the module registers `torch.ops.vllm.linear_attention`, the dispatcher this layer reuses.
from vllm.model_executor.layers.mamba.linear import minimax_linear_attn  # noqa: F401
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import get_kv_cache_torch_dtype
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from common_kernels.config import RingLinearConfig
from common_kernels.ops.linear_attn import linear_attention_decode, linear_attention_prefill
from common_kernels.ops.norm.fused import group_rms_norm_gate_triton
from common_kernels.ops.rope.fused import qk_norm_rope_triton
from common_kernels.ops.rope.naive import rotary_cos_sin, rotary_inv_freq
from common_kernels.precision import LINEAR_ATTN_DTYPE, ROPE_DTYPE
from common_kernels.slopes import decay_rates

from .backend import RingLinearBackend, RingLinearMetadata
from .compat import layer_metadata


def linear_state_shape(config: RingLinearConfig, tp_size: int) -> tuple[tuple[int, int, int]]:
    """One state per request and layer: `[H/tp, d, d]` (no conv state)."""
    H, _, d = config.linear_state_shape
    return ((H // tp_size, d, d),)


def linear_state_dtype(model_dtype: torch.dtype | str, mamba_cache_dtype: str | None) -> tuple[torch.dtype]:
    """fp32 unless the user asked for another dtype with `--mamba-cache-dtype` ("auto" means fp32 here, not the
    model dtype: a bf16 state is rounded every decode step and drifts by several percent over 4K tokens)."""
    if mamba_cache_dtype in (None, "auto"):
        return (torch.float32,)
    return (get_kv_cache_torch_dtype(mamba_cache_dtype, model_dtype),)


def linear_state_copy_funcs() -> tuple:
    """How vLLM copies a state between slots (prefix-caching align mode, spec decode): the plain temporal copy."""
    return MambaStateCopyFuncCalculator.linear_attention_state_copy_func()


class NormWeight(nn.Module):
    """A norm's weight as its own module, so it keeps the checkpoint name `<norm>.weight`."""

    def __init__(self, size: int, shard_across_tp: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        if shard_across_tp:
            set_weight_attrs(self.weight, {"weight_loader": sharded_weight_loader(0)})


class RingLinearAttention(nn.Module, MambaBase):
    """`attention.*` of a linear layer: query_key_value, qk-norms, g_proj, g_norm, dense.

    The model checks the TP size once (`RingLinearConfig.check_tensor_parallel`) before building layers."""

    def __init__(self, config: RingLinearConfig, vllm_config: VllmConfig, layer_idx: int, prefix: str) -> None:
        super().__init__()
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        H, d, D = config.num_attention_heads, config.head_dim, config.hidden_size
        quant_config = vllm_config.quant_config
        self.config, self.layer_idx, self.prefix = config, layer_idx, prefix
        self.model_config, self.cache_config = vllm_config.model_config, vllm_config.cache_config
        self.tp_size, self.num_local_heads, self.head_dim = tp_size, H // tp_size, d
        self.num_local_groups = config.group_norm_size // tp_size
        self.query_key_value = QKVParallelLinear(
            D, d, H, H, bias=False, quant_config=quant_config, prefix=f"{prefix}.query_key_value"
        )
        self.query_layernorm = NormWeight(d) if config.use_qk_norm else None
        self.key_layernorm = NormWeight(d) if config.use_qk_norm else None
        self.g_proj = ColumnParallelLinear(D, H * d, bias=False, quant_config=quant_config, prefix=f"{prefix}.g_proj")
        self.g_norm = NormWeight(H * d // tp_size, shard_across_tp=True)
        self.dense = RowParallelLinear(
            H * d, D, bias=False, quant_config=quant_config, reduce_results=True, prefix=f"{prefix}.dense"
        )
        # vLLM builds the model under its target device and never moves it: derived tables go there now, so
        # no step copies them from the host (a copy inside CUDA-graph capture would fail)
        device = torch.get_default_device()
        rates = decay_rates(config, layer_idx, dtype=torch.float32, device=device)
        local = slice(tp_rank * self.num_local_heads, (tp_rank + 1) * self.num_local_heads)
        self.register_buffer("decay_rate", rates[local].contiguous(), persistent=False)
        inv_freq, self.rope_scaling = rotary_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.kv_cache: tuple[torch.Tensor, ...] = (torch.tensor([]),)

        static_forward_context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in static_forward_context:
            raise ValueError(f"ring-linear: duplicate layer name {prefix!r}")
        static_forward_context[prefix] = self

    # ----- what vLLM's KV-cache manager asks of a hybrid-state layer --------------------------------------

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> tuple[tuple[int, int, int]]:
        return linear_state_shape(self.config, self.tp_size)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return linear_state_dtype(self.model_config.dtype, self.cache_config.mamba_cache_dtype)

    def get_attn_backend(self) -> type[RingLinearBackend]:
        return RingLinearBackend

    # ----- forward ----------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, output: torch.Tensor, positions: torch.Tensor) -> None:
        torch.ops.vllm.linear_attention(hidden_states, output, positions, self.prefix)

    def _forward(self, hidden_states: torch.Tensor, output: torch.Tensor, positions: torch.Tensor) -> None:
        """Called eagerly by `vllm::linear_attention`; writes the layer output into `output[:num_tokens]`."""
        metadata: RingLinearMetadata | None = layer_metadata(self.prefix)
        if metadata is None:  # profiling run: no state pool yet
            num_tokens = hidden_states.shape[0]
        else:
            num_tokens = metadata.num_decode_tokens + metadata.num_prefill_tokens
        a = hidden_states[:num_tokens]
        Hl, d = self.num_local_heads, self.head_dim
        qkv, _ = self.query_key_value(a)
        qkv = qkv.to(LINEAR_ATTN_DTYPE)
        if self.config.linear_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(num_tokens, 3 * Hl, d).split(Hl, dim=1)
        cos, sin = self._cos_sin(positions[:num_tokens], metadata)
        q_norm, k_norm = norm_weight(self.query_layernorm), norm_weight(self.key_layernorm)
        q, k = qk_norm_rope_triton(q, k, q_norm, k_norm, cos, sin, self.config.rms_norm_eps)
        o = self._attend(q, k, v, metadata) if metadata is not None else torch.zeros_like(v)
        gate, _ = self.g_proj(a)
        y = group_rms_norm_gate_triton(
            o.reshape(num_tokens, Hl * d), gate, self.g_norm.weight, self.num_local_groups, self.config.rms_norm_eps
        )
        out, _ = self.dense(y.to(hidden_states.dtype))
        output[:num_tokens] = out

    def _cos_sin(self, positions: torch.Tensor, metadata: RingLinearMetadata | None) -> tuple[torch.Tensor, ...]:
        """The RoPE table of this step's positions. The op's fixed signature carries positions, not the model's
        cos/sin: the step's first linear layer computes the table and leaves it on the shared metadata for the
        others (every linear layer has the same inverse frequencies). A table made outside a CUDA-graph
        capture is not reused inside one: the graph must hold the kernels that make it, or replays would
        read the positions of the capture."""
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if metadata is not None and metadata.rope_cos_sin is not None and metadata.rope_cos_sin[0] == capturing:
            return metadata.rope_cos_sin[1:]
        cos, sin = rotary_cos_sin(positions, self.inv_freq, self.rope_scaling, ROPE_DTYPE)
        if metadata is not None:
            metadata.rope_cos_sin = (capturing, cos, sin)
        return cos, sin

    def _attend(self, q, k, v, metadata: RingLinearMetadata) -> torch.Tensor:
        """Decodes (first in the batch) advance their slots in place; prefills run varlen from theirs."""
        pool = self.kv_cache[0]
        scale = self.head_dim**-0.5
        nd = metadata.num_decode_tokens
        parts = []
        if metadata.num_decodes > 0:
            slots = metadata.state_indices_tensor_d  # one token per decode; -1 marks CUDA-graph padding
            B = slots.shape[0]
            fresh = metadata.decode_fresh
            parts.append(linear_attention_decode(q[:B], k[:B], v[:B], self.decay_rate, scale, pool, slots, fresh=fresh))
            if nd > B:  # padded tokens beyond the padded requests: no state, zero output
                parts.append(v.new_zeros((nd - B, *v.shape[1:])))
        if metadata.num_prefills > 0:
            parts.append(
                linear_attention_prefill(
                    q[nd:],
                    k[nd:],
                    v[nd:],
                    self.decay_rate,
                    scale,
                    metadata.prefill_cu_seqlens,
                    pool,
                    metadata.state_indices_tensor_p,
                    metadata.prefill_fresh,
                    plan=metadata.prefill_plan,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def norm_weight(norm: NormWeight | None) -> torch.Tensor | None:
    """The weight of an optional norm (qk-norm is a config switch), None when the model has no such norm."""
    return None if norm is None else norm.weight
