"""One rank of the 2-rank CPU tensor-parallel check in test_linear_layer.py (run as a script)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import conftest  # noqa: E402  (the helpers, imported by path: this is a script, not a test module)

model_dir, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
conftest._install_cpu_platform()
from vllm.plugins import load_general_plugins  # noqa: E402

load_general_plugins()
torch.save(conftest.mixed_step_output(Path(model_dir), tp_size=world, rank=rank, port=port), out)
