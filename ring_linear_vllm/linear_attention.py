"""Ring-linear's linear-attention layer as a vLLM hybrid-state (`MambaBase`) layer.

vLLM's parallel linears do the projections; every step after the QKV GEMM is a `common_kernels` call,
the same code the training shim runs: `prepare_qkv` (one fused qk-RMSNorm + partial RoPE launch), the
step's varlen prefill and in-place decode on the fp32 state pool (one slot per request), `gate_output`
(fused group-RMSNorm + sigmoid gate, written in the model dtype). Like vLLM's Qwen3-Next, the projections
and both fused ops stay in the torch.compile'd graph (and its piecewise CUDA graphs); only the state
update sits behind the splitting op `vllm::ring_linear_attention`, which reads the step's metadata.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.utils import set_weight_attrs
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from common_kernels.config import RingLinearConfig
from common_kernels.model.linear_math import gate_output, prepare_qkv
from common_kernels.serving import aligned_mode, rank_decay_rates, use_aligned_projections, warm_up_linear_attention

from .backend import RingLinearBackend, RingLinearMetadata
from .compat import LINEAR_ATTENTION_OP, layer_metadata, register_splitting_op
from .engine_config import state_dtypes, state_shapes, state_tensor_count, states_per_entry


def linear_state_copy_funcs() -> tuple:
    """How vLLM copies a state between slots (prefix-caching align mode, spec decode): the plain temporal copy, for
    the state and, in aligned mode, each window buffer (a chunk can stop mid-window at a block boundary)."""
    (copy,) = MambaStateCopyFuncCalculator.linear_attention_state_copy_func()
    return (copy,) * state_tensor_count()


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
        self.cache_config = vllm_config.cache_config
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
        if aligned_mode():
            use_aligned_projections(self.query_key_value, self.g_proj, self.dense)
        # vLLM builds the model under its target device and never moves it: derived tables go there now, so
        # no step copies them from the host (a copy inside CUDA-graph capture would fail)
        device = torch.get_default_device()
        self.register_buffer(
            "decay_rate", rank_decay_rates(config, layer_idx, tp_size, tp_rank, device), persistent=False
        )
        self.scale = d**-0.5
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self.kv_cache: tuple[torch.Tensor, ...] = (torch.tensor([]),)
        self.stack, self.entry_row, self.entry_owner = _cache_entry(config, vllm_config, layer_idx, prefix)

        static_forward_context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in static_forward_context:
            raise ValueError(f"ring-linear: duplicate layer name {prefix!r}")
        static_forward_context[prefix] = self

    # ----- what vLLM's KV-cache manager asks of a hybrid-state layer --------------------------------------

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return state_shapes(self.config, self.tp_size, self.stack)

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        """The entry's spec from its first layer; the entry's other layers keep no cache of their own (vLLM skips a
        layer without a spec) and read their row of the first one's."""
        return None if self.entry_row else super().get_kv_cache_spec(vllm_config)

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """This layer's slot pool (and window buffers): its own cache, or its row of its entry's, a strided view the
        kernels index by slot stride."""
        if self.stack == 1:
            return tuple(self.kv_cache)
        from vllm.forward_context import get_forward_context

        owner = get_forward_context().no_compile_layers[self.entry_owner]
        return tuple(tensor[:, self.entry_row] for tensor in owner.kv_cache)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return state_dtypes(self.cache_config)

    def get_attn_backend(self) -> type[RingLinearBackend]:
        return RingLinearBackend

    # ----- forward ----------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Runs in the compiled graph; only the state update (`vllm::ring_linear_attention`) is eager."""
        num_tokens, eps = hidden_states.shape[0], self.config.rms_norm_eps
        qkv, _ = self.query_key_value(hidden_states)
        q, k, v = prepare_qkv(
            qkv, self.num_local_heads, norm_weight(self.query_layernorm), norm_weight(self.key_layernorm),
            cos, sin, eps, silu=self.config.linear_silu,
        )  # fmt: skip
        o = torch.empty((num_tokens, self.num_local_heads, self.head_dim), dtype=q.dtype, device=q.device)
        torch.ops.vllm.ring_linear_attention(q, k, v, o, self.prefix)
        gate, _ = self.g_proj(hidden_states)
        y = gate_output(
            o.view(num_tokens, -1), gate, self.g_norm.weight, self.num_local_groups, eps, hidden_states.dtype
        )
        out, _ = self.dense(y)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """The state update, behind the splitting op: this step's rows of `out` from the slot pool. In a
        profiling run (no metadata, no pool yet) the kernels run on scratch state instead: that compiles them
        and puts the prefill's largest scratch in vLLM's memory profile."""
        metadata: RingLinearMetadata | None = layer_metadata(self.entry_owner)  # the entry's group has it
        if metadata is None:
            warm_up_linear_attention(
                q, k, v, self.decay_rate, self.scale, self.get_state_dtype()[0], self.max_num_seqs, out=out,
                aligned=aligned_mode(),
            )  # fmt: skip
            return
        metadata.step.run(q, k, v, out, self.decay_rate, self.scale, *self.state_tensors())  # state (and windows)


def _cache_entry(
    config: RingLinearConfig, vllm_config: VllmConfig, layer_idx: int, prefix: str
) -> tuple[int, int, str]:
    """(layers per entry, this layer's row in its entry, the prefix of the entry's first layer): consecutive linear
    layers share an entry (`states_per_entry`)."""
    stack = states_per_entry(vllm_config)
    linear = config.linear_layer_ids
    ordinal = linear.index(layer_idx)
    row = ordinal % stack
    owner = prefix
    if row:
        marker, owner_marker = f"layers.{layer_idx}.", f"layers.{linear[ordinal - row]}."
        if marker not in prefix:
            raise ValueError(f"ring-linear: cannot name the cache entry of layer {prefix!r} (no {marker!r} in it)")
        owner = prefix.replace(marker, owner_marker, 1)
    return stack, row, owner


def norm_weight(norm: NormWeight | None) -> torch.Tensor | None:
    """The weight of an optional norm (qk-norm is a config switch), None when the model has no such norm."""
    return None if norm is None else norm.weight


def _ring_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor, layer_name: str
) -> None:
    from vllm.forward_context import get_forward_context

    get_forward_context().no_compile_layers[layer_name].attend(q, k, v, output)


def _ring_linear_attention_fake(q, k, v, output, layer_name) -> None:
    return None


register_splitting_op(LINEAR_ATTENTION_OP, _ring_linear_attention, _ring_linear_attention_fake, ["output"])
