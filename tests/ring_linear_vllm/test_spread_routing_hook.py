"""`benchmarks/server_hooks`: with `bench_serve`'s spread-routing switch on, a fresh process's vLLM dummy loader zeroes
every router's `expert_bias` (ours is a buffer, the Bailing twin's a parameter) after its fill, and leaves the other
weights filled (`scaled` also scales both routers' weights, once); with the switch off, the biases keep vLLM's
fill."""

import pytest

pytest.importorskip("vllm")  # the hook patches vLLM's own dummy loader

FILL = """
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

DummyModelLoader(LoadConfig(load_format="dummy")).load_weights(model, None)
"""


def test_the_hook_zeroes_every_expert_bias_after_vllms_dummy_fill_only_when_switched_on(biases_after_dummy_fill):
    assert biases_after_dummy_fill(FILL, "1") == "biases 0.0 0.0; routers as filled"
    assert biases_after_dummy_fill(FILL, "scaled") == "biases 0.0 0.0; routers scaled"
    assert biases_after_dummy_fill(FILL, "0").endswith("; routers as filled")
    assert not biases_after_dummy_fill(FILL, "0").startswith("biases 0.0 0.0")
