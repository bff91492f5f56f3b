"""Why fla `chunk_simple_gla` timed 2x slower here than in the spec: time each call option on its own.

Finding (H200, 2026-11-27): strided q/k/v views (the fused QKV layout) make it about 2x slower; the state
arguments and inference mode change nothing. The harness therefore hands fla contiguous inputs.
"""

import torch
from fla.ops.simple_gla import chunk_simple_gla

from benchmarks.bench_linear_attn import D, bench, fused_qkv
from common_kernels.presets import preset_config
from common_kernels.slopes import decay_rates


def call_options(T: int, H: int) -> dict:
    g = -decay_rates(preset_config("ring-mini-linear-2.0"), 0).cuda()[:H]
    strided = tuple(x[None] for x in fused_qkv(T, H))
    contiguous = tuple(x.contiguous() for x in strided)
    h0 = torch.zeros(1, H, D, D, device="cuda")
    scale = D**-0.5

    def call(qkv, **state):
        return lambda: chunk_simple_gla(*qkv, g_gamma=g, scale=scale, **state)

    return {
        "strided, h0+ht (old harness)": call(strided, initial_state=h0, output_final_state=True),
        "strided, no state": call(strided),
        "contiguous, no state": call(contiguous),
        "contiguous, ht only": call(contiguous, output_final_state=True),
        "contiguous, h0+ht": call(contiguous, initial_state=h0, output_final_state=True),
    }


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for T in (4096, 32768):
        for name, fn in call_options(T, 16).items():
            with torch.inference_mode():
                us_inference, _ = bench(fn, True)
            us, how = bench(fn, True)
            print(f"T={T} H=16 {name:30} {us:8.1f} us ({how}) | inference_mode {us_inference:8.1f} us")


if __name__ == "__main__":
    main()
