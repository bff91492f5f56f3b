"""Ring-linear-2.0 (`BailingMoeLinearV2ForCausalLM`) on SGLang's layers; module names equal the HF checkpoint's.

Layer l is a GQA softmax layer (SGLang's `RadixAttention` on its attention backend) when
`config.is_softmax_layer(l)`, else a linear-attention layer whose state update runs in
`backend.RingLinearAttnBackend` (SGLang's hybrid wrapper routes it there by layer id). Every step between the
linear layer's projections is `common_kernels` (`prepare_qkv`, `gate_output`), as in the shim and the vLLM
adapter. Numerics follow `common_kernels.precision`: fp32 residual stream with unfused norms, fp32 RoPE, fp32
router logits (the expert bias corrects selection in fp32), fp32 linear-attention path and state, fp32 LM head.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from sglang.srt.distributed import tensor_model_parallel_all_reduce
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.moe.ep_moe.layer import get_moe_impl_class
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.runtime_context import get_parallel
from torch import nn

from common_kernels.config import RingLinearConfig
from common_kernels.model.layers import RMSNorm
from common_kernels.model.linear_math import gate_output, prepare_qkv
from common_kernels.ops.moe.aligned import aligned_dense_mlp, aligned_moe, engine_moe_weights
from common_kernels.ops.rope.fused import gqa_qk_norm_rope
from common_kernels.ops.rope.naive import qk_norm_rope, rotary_cos_sin, rotary_inv_freq
from common_kernels.precision import LOGITS_DTYPE, RESIDUAL_DTYPE, ROPE_DTYPE
from common_kernels.serving import (
    RouterGate,
    aligned_mode,
    check_serving_settings,
    load_checkpoint_tensors,
    place_tensor,
    use_aligned_projections,
    warm_up_expert_tiers,
)

from . import aligned
from .compat import bind_top_k, top_k


class NormWeight(nn.Module):
    """A norm's weight as its own module, so it keeps the checkpoint name `<norm>.weight`; `shard` splits it
    over the attention-TP ranks (the linear layers' output norm holds whole groups per rank)."""

    def __init__(self, size: int, shard: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        if shard:
            self.weight.weight_loader = _load_attention_tp_shard


def _load_attention_tp_shard(param: nn.Parameter, loaded: torch.Tensor) -> None:
    parallel = get_parallel()
    size = loaded.shape[0] // parallel.attn_tp_size
    param.data.copy_(loaded[parallel.attn_tp_rank * size : (parallel.attn_tp_rank + 1) * size])


def _weight(norm: NormWeight | None) -> torch.Tensor | None:
    return None if norm is None else norm.weight


class RingMLP(nn.Module):
    """SwiGLU: the dense layers and the shared experts (`gate_proj`/`up_proj` fused, `down_proj`)."""

    def __init__(self, config: RingLinearConfig, width: int, quant_config, reduce_results: bool, prefix: str) -> None:
        super().__init__()
        D = config.hidden_size
        self.gate_up_proj = MergedColumnParallelLinear(
            D, [width] * 2, bias=False, quant_config=quant_config, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            width, D, bias=False, quant_config=quant_config, reduce_results=reduce_results, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = SiluAndMul()
        self.aligned = aligned_mode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aligned:  # the shim's kernel (`MLP.forward(aligned=True)`), not SGLang's fused silu-and-mul
            return aligned_dense_mlp(x, self.gate_up_proj.weight, self.down_proj.weight)
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class RingMoE(nn.Module):
    """Sigmoid group-limited top-k on fp32 router logits with the fp32 expert bias as SGLang's correction bias,
    routed scaling applied once (in SGLang's MoE), shared experts added before the one all-reduce."""

    def __init__(self, config: RingLinearConfig, layer_id: int, quant_config, prefix: str) -> None:
        super().__init__()
        self.aligned = aligned_mode()
        self.gate = RouterGate(config, invariant=self.aligned)
        grouped = config.n_group is not None and config.topk_group is not None
        self.topk = top_k(
            layer_id,
            top_k=config.num_experts_per_tok,
            use_grouped_topk=grouped,
            renormalize=config.norm_topk_prob,
            num_expert_group=config.n_group if grouped else None,
            topk_group=config.topk_group if grouped else None,
            correction_bias=self.gate.expert_bias,
            routed_scaling_factor=config.routed_scaling_factor,
        )
        self.experts = get_moe_impl_class(quant_config)(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            layer_id=layer_id,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            quant_config=quant_config,
            routed_scaling_factor=config.routed_scaling_factor,
            prefix=f"{prefix}.experts",
        )
        bind_top_k(self.topk, self.experts)
        self.shared_experts = (
            RingMLP(
                config,
                config.moe_shared_expert_intermediate_size * config.num_shared_experts,
                quant_config,
                reduce_results=False,
                prefix=f"{prefix}.shared_experts",
            )
            if config.num_shared_experts > 0
            else None
        )
        self.tp_size = get_parallel().tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aligned:  # the shim's MoE steps as one op (one rank: aligned mode refuses TP and EP)
            weights = engine_moe_weights(self.experts.w13_weight, self.experts.w2_weight, self.shared_experts)
            return aligned_moe(x, self.gate.weight, self.gate.expert_bias, *weights, *self.gate.routing)
        # shared experts first: SGLang's GPU MoE runner writes the routed result over its input (inplace=True)
        shared = None if self.shared_experts is None else self.shared_experts(x)
        out = self.experts(x, self.topk(x, self.gate(x)))
        if shared is not None:
            out = out + shared
        if self.tp_size > 1:  # no layer communicator here fuses or absorbs it: reduce once, shared experts included
            out = tensor_model_parallel_all_reduce(out)
        return out


class RingSoftmaxAttention(nn.Module):
    """`attention.*` of a softmax layer: GQA with qk-RMSNorm and partial RoPE through SGLang's attention."""

    def __init__(self, config: RingLinearConfig, layer_id: int, quant_config, prefix: str) -> None:
        super().__init__()
        tp_size = get_parallel().attn_tp_size
        H, Hkv, d, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.eps, self.head_dim = config.rms_norm_eps, d
        self.num_heads, self.num_kv_heads = H // tp_size, max(1, Hkv // tp_size)
        self.query_key_value = QKVParallelLinear(
            D, d, H, Hkv, bias=False, quant_config=quant_config, prefix=f"{prefix}.query_key_value"
        )
        self.query_layernorm = NormWeight(d) if config.use_qk_norm else None
        self.key_layernorm = NormWeight(d) if config.use_qk_norm else None
        self.dense = RowParallelLinear(
            H * d, D, bias=False, quant_config=quant_config, reduce_results=True, prefix=f"{prefix}.dense"
        )
        self.attn = RadixAttention(self.num_heads, d, d**-0.5, num_kv_heads=self.num_kv_heads, layer_id=layer_id)
        self.aligned = aligned_mode()
        if self.aligned:
            use_aligned_projections(self.query_key_value, self.dense)

    def forward(self, a, cos, sin, forward_batch) -> torch.Tensor:
        T, d = a.shape[0], self.head_dim
        qkv, _ = self.query_key_value(a)
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        weights = _weight(self.query_layernorm), _weight(self.key_layernorm)
        if self.aligned:  # the shim's qk-norm/RoPE and attention kernels (`ring_linear_sglang.aligned`)
            q, k = gqa_qk_norm_rope(qkv, self.num_heads, self.num_kv_heads, *weights, cos, sin, self.eps)
            o = aligned.attend(self.attn, q, k, v, forward_batch)
            out, _ = self.dense(o)
            return out
        q, k = qk_norm_rope(q.view(T, self.num_heads, d), k.view(T, self.num_kv_heads, d), *weights, cos, sin, self.eps)
        o = self.attn(q.reshape(T, -1), k.reshape(T, -1), v, forward_batch)
        out, _ = self.dense(o)
        return out


class RingLinearAttention(nn.Module):
    """`attention.*` of a linear layer: query_key_value, qk-norms, g_proj, g_norm, dense; the recurrence in the
    registered backend, reached through a `RadixAttention` that carries the layer id."""

    def __init__(self, config: RingLinearConfig, layer_id: int, quant_config, prefix: str) -> None:
        super().__init__()
        tp_size = get_parallel().attn_tp_size
        H, d, D = config.num_attention_heads, config.head_dim, config.hidden_size
        self.config, self.num_heads, self.head_dim = config, H // tp_size, d
        self.num_groups = config.group_norm_size // tp_size
        self.query_key_value = QKVParallelLinear(
            D, d, H, H, bias=False, quant_config=quant_config, prefix=f"{prefix}.query_key_value"
        )
        self.query_layernorm = NormWeight(d) if config.use_qk_norm else None
        self.key_layernorm = NormWeight(d) if config.use_qk_norm else None
        self.g_proj = ColumnParallelLinear(D, H * d, bias=False, quant_config=quant_config, prefix=f"{prefix}.g_proj")
        self.g_norm = NormWeight(H * d // tp_size, shard=True)
        self.dense = RowParallelLinear(
            H * d, D, bias=False, quant_config=quant_config, reduce_results=True, prefix=f"{prefix}.dense"
        )
        if aligned_mode():
            use_aligned_projections(self.query_key_value, self.g_proj, self.dense)
        self.attn = RadixAttention(self.num_heads, d, d**-0.5, num_kv_heads=self.num_heads, layer_id=layer_id)

    def forward(self, a, cos, sin, forward_batch) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        qkv, _ = self.query_key_value(a)
        q, k, v = prepare_qkv(
            qkv, self.num_heads, _weight(self.query_layernorm), _weight(self.key_layernorm), cos, sin, eps,
            silu=self.config.linear_silu,
        )  # fmt: skip
        o = self.attn(q, k, v, forward_batch)
        gate, _ = self.g_proj(a)
        out, _ = self.dense(gate_output(o, gate, self.g_norm.weight, self.num_groups, eps, a.dtype))
        return out


class RingDecoderLayer(nn.Module):
    """Pre-norm block on an fp32 residual: `h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h))` (unfused). SGLang finds
    the parts by the attribute names `attention` and `mlp`."""

    def __init__(self, config: RingLinearConfig, layer_id: int, quant_config, dtype: torch.dtype, prefix: str) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.dtype, self.aligned = dtype, aligned_mode()  # aligned: the norms through the shim's kernel
        attention = RingSoftmaxAttention if config.is_softmax_layer(layer_id) else RingLinearAttention
        self.input_layernorm = RMSNorm(D, eps)
        self.attention = attention(config, layer_id, quant_config, prefix=f"{prefix}.attention")
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.mlp = (
            RingMoE(config, layer_id, quant_config, prefix=f"{prefix}.mlp")
            if config.is_moe_layer(layer_id)
            else RingMLP(config, config.intermediate_size, quant_config, reduce_results=True, prefix=f"{prefix}.mlp")
        )

    def forward(self, h, cos, sin, forward_batch) -> torch.Tensor:
        a = self.input_layernorm(h, self.dtype, self.aligned)
        h = h + self.attention(a, cos, sin, forward_batch).to(h.dtype)
        return h + self.mlp(self.post_attention_layernorm(h, self.dtype, self.aligned)).to(h.dtype)


class RingLinearModel(nn.Module):
    def __init__(self, config: RingLinearConfig, quant_config, prefix: str) -> None:
        super().__init__()
        self.dtype = torch.get_default_dtype()  # SGLang sets it to the served dtype (--dtype) while it builds
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.word_embeddings"
        )
        self.layers = nn.ModuleList(
            RingDecoderLayer(config, l, quant_config, self.dtype, prefix=f"{prefix}.layers.{l}")
            for l in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.aligned = aligned_mode()
        inv_freq, self.rope_scaling = rotary_inv_freq(config)  # computed on the CPU, as the shim's
        # held where SGLang builds the model (its device context), so no step copies it from the host
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def forward(self, input_ids, positions, forward_batch, inputs_embeds=None) -> torch.Tensor:
        h = (self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds).to(RESIDUAL_DTYPE)
        cos, sin = rotary_cos_sin(positions, self.inv_freq, self.rope_scaling, ROPE_DTYPE)
        for layer in self.layers:
            h = layer(h, cos, sin, forward_batch)
        return self.norm(h, self.dtype, self.aligned)


class RingLinearForCausalLM(nn.Module):
    """What SGLang builds for `BailingMoeLinearV2ForCausalLM` (and the authors' aliases)."""

    def __init__(self, *, config: RingLinearConfig, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        check_serving_settings(config, get_parallel().attn_tp_size, pipeline_parallel_supported=False)
        self.config, self.quant_config = config, quant_config
        self.model = RingLinearModel(config, quant_config, prefix="model")
        self.aligned = aligned_mode()
        if self.aligned:  # the first forward (a CUDA graph's warm-up run) compiles every expert tier a prompt can
            warm_up_expert_tiers(config.max_position_embeddings)  # take (aligned mode prefills a prompt in one step)
        # aligned: the model dtype, as the shim's and vLLM's heads (the aligned GEMM takes another kernel for fp32
        # weights, so an fp32 head gives other bits); default: fp32, for the fp32 GEMM below
        head_dtype = None if self.aligned else LOGITS_DTYPE
        self.lm_head = (
            self.model.word_embeddings
            if config.tie_word_embeddings
            else ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype=head_dtype, prefix="lm_head")
        )
        self.logits_processor = LogitsProcessor(config)
        self.aligned_lm_head = aligned.AlignedLMHead(self.lm_head) if self.aligned else None
        # inference only: SGLang captures its decode graphs outside no_grad, and its fused-MoE reduction
        # (`torch.sum(..., out=)`) refuses inputs that require grad; our own norm/router weights default to it
        self.requires_grad_(False)

    def forward(self, input_ids, positions, forward_batch, inputs_embeds=None, pp_proxy_tensors=None):
        hidden = self.model(input_ids, positions, forward_batch, inputs_embeds)
        if self.aligned:  # the shim's LM head GEMM on the model-dtype hidden states (`logits(aligned=True)`)
            return self.logits_processor(input_ids, hidden, self.aligned_lm_head, forward_batch)
        return self.logits_processor(input_ids, hidden.to(LOGITS_DTYPE), self.lm_head, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named tensors, checked against the config (a name or shape the format does not have raises
        `CheckpointError` naming it); returns the parameters filled."""
        params = dict(self.named_parameters())
        experts = FusedMoE.make_expert_params_mapping(
            ckpt_gate_proj_name="gate_proj",
            ckpt_down_proj_name="down_proj",
            ckpt_up_proj_name="up_proj",
            num_experts=self.config.num_experts,
        )

        def load_tensor(name: str, tensor: torch.Tensor) -> str:
            return place_tensor(params, experts, name, tensor, default_weight_loader)

        return load_checkpoint_tensors(weights, self.config, load_tensor)


EntryClass = [RingLinearForCausalLM]
