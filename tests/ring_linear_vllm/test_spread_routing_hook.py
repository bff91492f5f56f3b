"""`benchmarks/server_hooks`: with `bench_serve`'s spread-routing switch on, a fresh process's vLLM dummy loader zeroes
every router's `expert_bias` (ours is a buffer, the Bailing twin's a parameter) after its fill, and leaves the other
weights filled; with the switch off, the biases keep vLLM's fill."""

import os
import subprocess
import sys

import pytest

from benchmarks import bench_serve

pytest.importorskip("vllm")  # the hook patches vLLM's own dummy loader

CHECK = """
import torch
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

class Gate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(8, 4))
        self.register_buffer("expert_bias", torch.zeros(8))

model = torch.nn.ModuleDict({"gate": Gate(), "twin_gate": torch.nn.Linear(4, 8)})
model.twin_gate.expert_bias = torch.nn.Parameter(torch.zeros(8))
DummyModelLoader(LoadConfig(load_format="dummy")).load_weights(model, None)
assert model.gate.weight.abs().max() > 0 and model.twin_gate.weight.abs().max() > 0
print("biases", float(model.gate.expert_bias.abs().max()), float(model.twin_gate.expert_bias.abs().max()))
"""


def biases_after_the_dummy_fill(switch: str) -> str:
    env = bench_serve.routing_env(dict(os.environ), "spread") | {"RING_LINEAR_SPREAD_ROUTING": switch}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_hook_zeroes_every_expert_bias_after_vllms_dummy_fill_only_when_switched_on():
    assert biases_after_the_dummy_fill("1") == "biases 0.0 0.0"
    assert biases_after_the_dummy_fill("0") != "biases 0.0 0.0"
