"""One rank of the 2-rank CPU parallelism checks in test_linear_layer.py and test_model.py (run as a script).

tp_worker.py tp|pp MODEL_DIR RANK PORT OUT
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import conftest  # noqa: E402  (the helpers, imported by path: this is a script, not a test module)

from ring_linear_vllm.testing import install_cpu_platform  # noqa: E402

mode, model_dir, rank, port, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
install_cpu_platform()
from vllm.plugins import load_general_plugins  # noqa: E402

load_general_plugins()
if mode == "tp":
    torch.save(conftest.mixed_step_output(model_dir, tp_size=2, rank=rank, port=port), out)
else:
    Path(out).write_text(json.dumps(conftest.pipeline_stage_load(model_dir, pp_size=2, rank=rank, port=port)))
