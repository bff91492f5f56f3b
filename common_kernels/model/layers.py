"""The layers of Ring-linear-2.0 as `torch.nn.Module`s, named exactly as in the HF checkpoint.

All tensors are packed: `[T, ...]` tokens of `N` sequences delimited by `cu_seqlens` `[N+1]`. Layers call
the functions of `common_kernels.ops`; the precision of every step is `common_kernels.precision`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RingLinearConfig
from ..ops.attention.aligned import causal_attention_aligned
from ..ops.attention.naive import causal_gqa_attention
from ..ops.linear_attn.backward import linear_attention_varlen_triton
from ..ops.linear_attn.naive import linear_attention_varlen
from ..ops.linear_attn.windowed import linear_attention_as_served
from ..ops.moe.aligned import every_token, expert_outputs
from ..ops.moe.naive import moe_combine, route, selection_margin, swiglu_mlp
from ..ops.moe.router_gemm import aligned_linear
from ..ops.moe.select import aligned_route
from ..ops.norm.naive import rms_norm
from ..ops.norm.rms import rms_norm_aligned
from ..ops.packing import equal_length_groups
from ..ops.rope.fused import qk_norm_rope_triton
from ..ops.rope.naive import qk_norm_rope
from ..slopes import decay_rates
from .cache import RingLinearCache
from .linear_math import gate_output, prepare_qkv


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares."""

    cu_seqlens: list[int]  # [N+1] host offsets of the packed sequences
    cu_seqlens_device: torch.Tensor  # the same offsets on the device, built once per forward
    cos: torch.Tensor  # [T, rotary_dim/2]
    sin: torch.Tensor
    cache: RingLinearCache | None
    use_triton: bool = False  # qk-norm/RoPE, linear attention and norm/gate through the Triton kernels
    aligned: bool = False  # aligned mode (`RingLinearForCausalLM.token_logprobs(aligned=True)`)

    def sequences(self):
        return zip(self.cu_seqlens[:-1], self.cu_seqlens[1:], strict=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, **factory) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, **factory))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None, aligned: bool = False) -> torch.Tensor:
        """`aligned`: aligned mode's kernel (`ops.norm.rms`), which an aligned engine runs too."""
        return (rms_norm_aligned if aligned else rms_norm)(x, self.weight, self.eps, out_dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers, every expert, and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, **factory) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor, aligned: bool = False) -> torch.Tensor:
        """`aligned`: as one expert every token picks (`ops.moe.aligned`), the kernel an aligned engine's dense layer
        runs: a compiled engine would otherwise fuse `silu(gate) * up` with one rounding where eager rounds twice."""
        if aligned:
            weights = [self.gate_proj.weight], [self.up_proj.weight], [self.down_proj.weight]
            return expert_outputs(x, *every_token(x), *weights).to(x.dtype)
        return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class ExpertGate(nn.Module):
    """Router weight `[E, D]` and selection bias `[E]`, both fp32 whatever the model dtype (float64 in a float64
    model): logits in fp32 from an fp32 weight, as the engines hold it (`serving.RouterGate`), since near-ties
    decide which experts run and a bf16 copy of an fp32 checkpoint's weight would choose others."""

    def __init__(self, config: RingLinearConfig, **factory) -> None:
        super().__init__()
        dtype = torch.float64 if factory.get("dtype") == torch.float64 else torch.float32
        device = factory.get("device")
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=dtype, device=device))
        self.register_buffer(
            "expert_bias",
            torch.zeros(config.num_experts, dtype=dtype, device=device),
            persistent=config.moe_router_enable_expert_bias,
        )

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` must round neither: keep fp32 (or float64), follow the device
        weight, bias = self.weight.data, self.expert_bias
        super()._apply(fn, recurse)
        if self.weight.dtype not in (torch.float32, torch.float64):
            self.weight.data = weight.to(device=self.weight.device)
        if self.expert_bias.is_floating_point() and self.expert_bias.dtype not in (torch.float32, torch.float64):
            self.expert_bias = bias.to(device=self.expert_bias.device)
        return self


class MoE(nn.Module):
    def __init__(self, config: RingLinearConfig, **factory) -> None:
        super().__init__()
        self.config = config
        self.gate = ExpertGate(config, **factory)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size, **factory) for _ in range(config.num_experts)
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_shared_expert_intermediate_size * config.num_shared_experts, **factory)
            if config.num_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor, aligned: bool = False) -> torch.Tensor:
        """`aligned`: the steps of an aligned engine's MoE (`ops.moe.aligned.aligned_moe`), with autograd."""
        ids, weights = self.route(x, aligned)
        if aligned:
            out = expert_outputs(x, ids, weights, *_expert_weights(self.experts))
            if self.shared_experts is not None:
                out = out + expert_outputs(x, *every_token(x), *_expert_weights([self.shared_experts]))
            return out.to(x.dtype)
        out = moe_combine(x, ids, weights, self.experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).to(out.dtype)
        return out.to(x.dtype)

    def route(self, x: torch.Tensor, aligned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts and weights (`ops.moe.naive.route`); `aligned`: as an aligned engine chooses them
        (`ops.moe.select.aligned_route`)."""
        c = self.config
        return (aligned_route if aligned else route)(
            x, *self._selection_inputs(), c.routed_scaling_factor, c.norm_topk_prob
        )

    def selection_margin(self, x: torch.Tensor) -> torch.Tensor:
        """How far each token's expert choice is from changing (`ops.moe.naive.selection_margin`)."""
        return selection_margin(x, *self._selection_inputs())

    def _selection_inputs(self) -> tuple:
        c = self.config
        bias = self.gate.expert_bias if c.moe_router_enable_expert_bias else None
        return self.gate.weight, bias, c.num_experts_per_tok, c.n_group, c.topk_group


def _expert_weights(experts) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The experts' gate, up and down weights, each as a list in expert order."""
    return tuple([getattr(m, name).weight for m in experts] for name in ("gate_proj", "up_proj", "down_proj"))


class Projection(nn.Linear):
    """A bias-free `nn.Linear` whose aligned forward is aligned mode's invariant GEMM (`aligned_linear`), which the
    engines' projection layers run too."""

    def __init__(self, in_features: int, out_features: int, **factory) -> None:
        super().__init__(in_features, out_features, bias=False, **factory)

    def forward(self, x: torch.Tensor, aligned: bool = False) -> torch.Tensor:
        return aligned_linear(x, self.weight) if aligned else F.linear(x, self.weight)


class SoftmaxAttention(nn.Module):
    """GQA causal attention with qk-norm and partial RoPE; K/V cached after norm and RoPE."""

    def __init__(self, config: RingLinearConfig, layer_idx: int, **factory) -> None:
        super().__init__()
        H, Hkv, d, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, H, Hkv, d
        self.eps = config.rms_norm_eps
        self.query_key_value = Projection(D, (H + 2 * Hkv) * d, **factory)
        self.query_layernorm = RMSNorm(d, config.rms_norm_eps, **factory) if config.use_qk_norm else None
        self.key_layernorm = RMSNorm(d, config.rms_norm_eps, **factory) if config.use_qk_norm else None
        self.dense = Projection(H * d, D, **factory)

    def forward(self, a: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = a.shape[0]
        qkv = self.query_key_value(a, ctx.aligned).reshape(T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=1)
        q, k = (qk_norm_rope_triton if ctx.use_triton else qk_norm_rope)(
            q, k, _weight(self.query_layernorm), _weight(self.key_layernorm), ctx.cos, ctx.sin, self.eps
        )
        scale = self.head_dim**-0.5
        if ctx.aligned and ctx.cache is None:  # the aligned engine's kernel (`ops.attention.aligned`)
            max_len = max((e - s for s, e in ctx.sequences()), default=0)
            o = causal_attention_aligned(q, k, v, ctx.cu_seqlens_device, scale, max_len)
        elif ctx.cache is None:  # sequences of equal length run as one batch
            o = torch.empty_like(q)
            for length, members, rows in equal_length_groups(ctx.cu_seqlens, q.device):
                batch = [x[rows].reshape(len(members), length, *x.shape[1:]) for x in (q, k, v)]
                o = o.index_copy(0, rows, causal_gqa_attention(*batch, scale).reshape(-1, *q.shape[1:]))
        else:
            outputs = []
            for n, (s, e) in enumerate(ctx.sequences()):
                k_all, v_all = ctx.cache.append_kv(self.layer_idx, n, k[s:e], v[s:e])
                outputs.append(causal_gqa_attention(q[s:e], k_all, v_all, scale))
            o = torch.cat(outputs) if outputs else q
        return self.dense(o.reshape(T, -1), ctx.aligned)


class LinearAttention(nn.Module):
    """Linear attention with a fixed per-head decay, grouped output RMSNorm and sigmoid output gate.

    After the QKV GEMM everything runs in fp32 (q/k/v, qk-norm, RoPE, recurrence, norm, gate); the
    result is cast to the model dtype before the output projection.
    """

    def __init__(self, config: RingLinearConfig, layer_idx: int, **factory) -> None:
        super().__init__()
        H, d, D = config.num_attention_heads, config.head_dim, config.hidden_size
        self.config, self.layer_idx, self.num_heads, self.head_dim = config, layer_idx, H, d
        self.query_key_value = Projection(D, 3 * H * d, **factory)
        self.query_layernorm = RMSNorm(d, config.rms_norm_eps, **factory) if config.use_qk_norm else None
        self.key_layernorm = RMSNorm(d, config.rms_norm_eps, **factory) if config.use_qk_norm else None
        self.g_proj = Projection(D, H * d, **factory)
        self.g_norm = RMSNorm(H * d, config.rms_norm_eps, **factory)
        self.dense = Projection(H * d, D, **factory)

    def forward(self, a: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T, c = a.shape[0], self.config
        q, k, v = prepare_qkv(
            self.query_key_value(a, ctx.aligned), self.num_heads, _weight(self.query_layernorm),
            _weight(self.key_layernorm), ctx.cos, ctx.sin, c.rms_norm_eps, silu=c.linear_silu,
            use_triton=ctx.use_triton,
        )  # fmt: skip
        rates = decay_rates(c, self.layer_idx, dtype=q.dtype, device=a.device)
        if ctx.aligned:  # v as the engine passes it: widening in the kernel is exact
            o = linear_attention_as_served(q, k, v, rates, self.head_dim**-0.5, ctx.cu_seqlens)
        else:
            initial = None if ctx.cache is None else ctx.cache.linear_states[self.layer_idx]
            attention = linear_attention_varlen_triton if ctx.use_triton else linear_attention_varlen
            o, final = attention(q, k, v.to(q.dtype), rates, self.head_dim**-0.5, ctx.cu_seqlens_device, initial)
            if ctx.cache is not None:
                ctx.cache.linear_states[self.layer_idx] = final
        y = gate_output(
            o.reshape(T, -1), self.g_proj(a, ctx.aligned), self.g_norm.weight, c.group_norm_size, c.rms_norm_eps,
            a.dtype, use_triton=ctx.use_triton,
        )  # fmt: skip
        return self.dense(y, ctx.aligned)


class DecoderLayer(nn.Module):
    """Pre-norm block: `h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h))`, residual `h` kept in fp32, unfused."""

    def __init__(self, config: RingLinearConfig, layer_idx: int, **factory) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps, **factory)
        attention = SoftmaxAttention if config.is_softmax_layer(layer_idx) else LinearAttention
        self.attention = attention(config, layer_idx, **factory)
        self.post_attention_layernorm = RMSNorm(D, eps, **factory)
        self.mlp = (
            MoE(config, **factory) if config.is_moe_layer(layer_idx) else MLP(D, config.intermediate_size, **factory)
        )

    def forward(self, h: torch.Tensor, ctx: ForwardContext, dtype: torch.dtype) -> torch.Tensor:
        h = h + self.attention(self.input_layernorm(h, dtype, ctx.aligned), ctx).to(h.dtype)
        x = self.post_attention_layernorm(h, dtype, ctx.aligned)
        return h + self.mlp(x, ctx.aligned).to(h.dtype)


def _weight(norm: RMSNorm | None) -> torch.Tensor | None:
    return None if norm is None else norm.weight
