"""`benchmarks/server_hooks` on SGLang: with `bench_serve`'s spread-routing switch on, a fresh process's SGLang dummy
fill (the `initialize_dummy_weights` its `DummyModelLoader` calls) zeroes every router's `expert_bias` and leaves the
other weights filled (`scaled` also scales both routers' weights); with the switch off, the biases keep SGLang's
fill."""

import inspect

import pytest

pytest.importorskip("sglang")  # the hook patches SGLang's own dummy loader

FILL = """
from sglang.srt.model_loader import loader

loader.initialize_dummy_weights(model)
"""


def test_the_hook_zeroes_every_expert_bias_after_sglangs_dummy_fill_only_when_switched_on(biases_after_dummy_fill):
    from sglang.srt.model_loader import loader

    assert "initialize_dummy_weights(" in inspect.getsource(loader.DummyModelLoader.load_model)
    assert biases_after_dummy_fill(FILL, "1") == "biases 0.0 0.0; routers as filled"
    assert biases_after_dummy_fill(FILL, "scaled") == "biases 0.0 0.0; routers scaled"
    assert biases_after_dummy_fill(FILL, "0").endswith("; routers as filled")
    assert not biases_after_dummy_fill(FILL, "0").startswith("biases 0.0 0.0")
