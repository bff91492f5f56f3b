"""Run the default prefill and decode launches once on small real-head shapes, for compute-sanitizer.

compute-sanitizer --tool memcheck python -m benchmarks.memcheck_linear_attn
"""

import torch

from common_kernels import decay_rates, preset_config
from common_kernels.ops.linear_attn.decode import linear_attention_decode
from common_kernels.ops.linear_attn.prefill import linear_attention_prefill

from .bench_linear_attn import D, fused_qkv

if __name__ == "__main__":
    H = 16
    rate = decay_rates(preset_config("ring-mini-linear-2.0"), 0).cuda()
    lengths = [1000, 1, 0, 3000, 77]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q, k, v = fused_qkv(sum(lengths), H)
    pool = torch.zeros(len(lengths) + 2, H, D, D, device="cuda")
    slots = torch.tensor([3, 0, 6, -1, 1], device="cuda", dtype=torch.int32)
    linear_attention_prefill(q, k, v, rate, D**-0.5, cu, pool, slots, max_seqlen=3000)
    for B in (3, 40):
        qd, kd, vd = fused_qkv(B, H)
        linear_attention_decode(
            qd, kd, vd, rate, D**-0.5, pool, torch.arange(B, device="cuda", dtype=torch.int32) % 7 - int(B > 3)
        )
    torch.cuda.synchronize()
    print("memcheck run finished")
