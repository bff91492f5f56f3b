"""A random checkpoint at a released model's shapes, cut to its first layer group (or N layers), written by the
shim: what the aligned GPU tests and the layer-diff tools serve where Ring-mini's shapes matter and its weights
do not (the tiny model's 16-wide heads hide what 128-wide ones show).

    python -m benchmarks.random_checkpoint OUT [--preset ring-mini-linear-2.0] [--layers N] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common_kernels import RingLinearForCausalLM
from common_kernels.config import RingLinearConfigError
from common_kernels.presets import PRESETS, preset_config


def write_random_checkpoint(
    path: str | Path,
    preset: str = "ring-mini-linear-2.0",
    layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write the checkpoint (config and weights, `dtype`) to `path`; `layers` defaults to one layer group;
    `overrides`: other config fields (a test's smaller widths)."""
    group = overrides.get("layer_group_size", preset_config(preset).layer_group_size)
    config = preset_config(preset, num_hidden_layers=group if layers is None else layers, **overrides)
    model = RingLinearForCausalLM(config)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    model.to(dtype).save_pretrained(path)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--preset", default="ring-mini-linear-2.0", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="default: one layer group")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    try:
        print(write_random_checkpoint(args.out, args.preset, args.layers, getattr(torch, args.dtype)))
    except RingLinearConfigError as error:  # e.g. fewer layers than one group: one line naming the field
        parser.error(str(error))


if __name__ == "__main__":
    main()
