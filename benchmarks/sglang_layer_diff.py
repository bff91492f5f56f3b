"""Where the SGLang engine and the training shim part ways: one prompt through `sglang.Engine` with SGLang's
tensor dump (`debug_tensor_dump_output_folder`: every leaf module's output, CUDA graphs off), the same prompt
through the shim with forward hooks, and the modules both have compared in forward order. Run on the GPU
machine with SGLang staged (shared/gpu-env) and the plugin's entry point installed (`gpu_checks.sh` writes it):

    python -m benchmarks.sglang_layer_diff CHECKPOINT [--length 8] [--dtype float32]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from benchmarks.layer_diff import compare, shim_outputs


def engine_outputs(checkpoint: str, prompt: list[int], dtype: str, dump_dir: Path) -> dict[str, torch.Tensor]:
    """SGLang's dump of the prompt's prefill pass (the pass whose input ids are the prompt)."""
    import sglang

    engine = sglang.Engine(
        model_path=checkpoint, dtype=dtype, attention_backend="triton", skip_tokenizer_init=True,
        mem_fraction_static=0.3, disable_radix_cache=True, debug_tensor_dump_output_folder=str(dump_dir),
        disable_cuda_graph=True,
    )  # fmt: skip
    try:
        engine.generate(input_ids=[prompt], sampling_params={"temperature": 0.0, "max_new_tokens": 1})
    finally:
        engine.shutdown()
    for path in sorted(dump_dir.rglob("Pass*.pt")):
        tensors = torch.load(path)
        ids = next((t for name, t in tensors.items() if name.endswith("forward_batch_info.input_ids")), None)
        if ids is not None and ids.tolist() == prompt:
            return {
                name: t.float() if isinstance(t, torch.Tensor) else [x.float() for x in t]
                for name, t in tensors.items()
                if isinstance(t, (torch.Tensor, list))
            }
    raise RuntimeError(f"no dumped pass under {dump_dir} holds the prompt's prefill")


def local_checks(engine: dict, shim: torch.nn.Module, device: str = "cuda") -> list[tuple[str, float, float]]:
    """Each engine layer part fed the engine's own input (its dumped upstream output) against the shim's math on
    the same input, so a wrong part shows by itself: routing, routed + shared experts, linear and softmax
    attention from the dumped QKV output."""
    from common_kernels.model.linear_math import prepare_qkv
    from common_kernels.ops.attention.naive import causal_gqa_attention
    from common_kernels.ops.linear_attn.naive import linear_attention_varlen
    from common_kernels.ops.rope.naive import qk_norm_rope, rotary_cos_sin, rotary_inv_freq
    from common_kernels.slopes import decay_rates

    config = shim.config
    H, Hkv, d, eps = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.rms_norm_eps
    inv_freq, scaling = rotary_inv_freq(config)
    rows = []
    for l, layer in enumerate(shim.model.layers):
        base = f"model.layers.{l}"
        x = engine.get(f"{base}.post_attention_layernorm")
        if x is not None and f"{base}.mlp.experts" in engine:
            x = x.to(device)
            mlp = layer.mlp
            with torch.no_grad():
                want = mlp(x.to(mlp.gate.weight.dtype)).float().cpu()
                ids, weights = mlp.route(x)
            got = engine[f"{base}.mlp.experts"] + engine.get(f"{base}.mlp.shared_experts.down_proj", 0.0)
            rows.append((f"{base}.mlp (local)", (got - want).abs().max().item(), want.abs().max().item()))
            topk = engine.get(f"{base}.mlp.topk")
            if isinstance(topk, list) and len(topk) >= 2:
                got_w, got_ids = topk[0], topk[1].long()
                same = (got_ids.sort(-1).values == ids.cpu().sort(-1).values).float().mean().item()
                order_w = weights.float().cpu().gather(1, ids.cpu().argsort(-1))
                got_order = got_w.gather(1, got_ids.argsort(-1))
                rows.append((f"{base}.mlp.topk ids equal (fraction)", 1.0 - same, 1.0))
                label = f"{base}.mlp.topk weights (engine max {got_order.abs().max():.3g})"
                rows.append((label, (got_order - order_w).abs().max().item(), order_w.abs().max().item()))
        qkv, attn = engine.get(f"{base}.attention.query_key_value"), engine.get(f"{base}.attention.attn")
        if qkv is None or attn is None:
            continue
        qkv, T = qkv.to(device), qkv.shape[0]
        cos, sin = rotary_cos_sin(torch.arange(T, device=device), inv_freq, scaling, torch.float32)
        a = layer.attention
        qw = None if a.query_layernorm is None else a.query_layernorm.weight
        kw = None if a.key_layernorm is None else a.key_layernorm.weight
        with torch.no_grad():
            if config.is_softmax_layer(l):
                q, k, v = qkv.view(T, H + 2 * Hkv, d).split((H, Hkv, Hkv), dim=1)
                q, k = qk_norm_rope(q, k, qw, kw, cos, sin, eps)
                want = causal_gqa_attention(q, k, v, d**-0.5)
            else:
                q, k, v = prepare_qkv(qkv, H, qw, kw, cos, sin, eps, silu=config.linear_silu, use_triton=False)
                cu = torch.tensor([0, T], device=device)
                rates = decay_rates(config, l, dtype=q.dtype, device=device)
                want, _ = linear_attention_varlen(q, k, v.to(q.dtype), rates, d**-0.5, cu)
        want = want.float().cpu().reshape(T, -1)
        rows.append((f"{base}.attention.attn (local)", (attn.reshape(T, -1) - want).abs().max().item(),
                     want.abs().max().item()))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--length", type=int, default=8)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--save", type=Path, help="also write both dumps here (torch.save), to study without a GPU")
    args = parser.parse_args()
    from common_kernels import RingLinearForCausalLM

    # the shim first: the engine's start-up must not change what the reference computes
    model = RingLinearForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype), device="cuda")
    prompt = [random.Random(0).randrange(3, model.config.vocab_size) for _ in range(args.length)]
    shim = shim_outputs(model, prompt)
    with tempfile.TemporaryDirectory() as tmp:
        engine = engine_outputs(args.checkpoint, prompt, args.dtype, Path(tmp))
    if args.save is not None:
        torch.save({"prompt": prompt, "engine": engine, "shim": shim}, args.save)
    print(f"modules dumped: engine {len(engine)}, shim {len(shim)}; compared (engine order):")
    for name, diff, scale in compare(engine, shim):
        print(f"{diff:10.3e} (of {scale:9.3e})  {name}")
    print("engine only:", sorted(set(engine) - set(shim)))
    print("module-local checks (the engine part on its own dumped input against the shim's math):")
    for name, diff, scale in local_checks(engine, model):
        print(f"{diff:10.3e} (of {scale:9.3e})  {name}")


if __name__ == "__main__":
    main()
