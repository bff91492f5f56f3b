"""One rank of the 2-rank CPU (gloo) check in test_linear_layer.py (run as a script, by that test):

tp_worker.py TINY_DIR RELEASED_DIR RANK PORT OUT
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import conftest  # noqa: E402  (the helpers, imported by path: this is a script, not a test module)

import ring_linear_sglang  # noqa: E402

tiny_dir, released_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[5]
rank, port = int(sys.argv[3]), int(sys.argv[4])

ring_linear_sglang.register()
kit = __import__("sglang.test.kits.attention_unittest.attention_methods.lightning_attention", fromlist=["_"])
kit._parallel_override.__exit__(None, None, None)  # importing the kit pins attention TP to 1: this world has 2
conftest.start_world(released_dir, tp_size=2, rank=rank, port=port)
torch.save(conftest.linear_layer_errors(tiny_dir, kit, tp_size=2), out)
