"""Dummy weights that route like a trained model.

vLLM's dummy loader fills every parameter and persistent buffer with uniform values in [-1e-3, 1e-3], seeded per
tensor by one fixed seed, so every MoE layer of Ring-mini (and of its softmax twin) gets the same `expert_bias`,
and that bias outweighs the router's scores: the same 8 or 9 of 256 experts serve every token in every layer
(`tests/benchmarks/test_spread_routing.py` counts them). A served benchmark on such weights times MoE layers that
read 9 experts, where a trained model's tokens spread over most of them. With the bias zeroed after the dummy
fill, each token's own scores choose, and a batch of 64 tokens reaches about 220 experts, as uniform routing does.

SGLang's dummy loader fills alike (`initialize_dummy_weights`, the same range and seed) and so routes alike.

`install(scaled=True)` (`RING_LINEAR_SPREAD_ROUTING=scaled`) also scales each router's weight so that a token's
logits spread with a standard deviation near 1 instead of about 1.5e-5: with the dummy fill the router's sigmoid
scores all lie within 1e-5 of 0.5, where any kernel that rounds a score to 16 bits ties them all and its tie-breaking,
not the token, chooses the experts. The shim routes such scores in fp32 and spreads them (CPU); whether an engine's
fused top-k does is what `benchmarks/probe_routing.py` counts, with and without the scaling.

`install()` patches the engines' dummy loaders (vLLM's fill functions of 0.26 and of 0.33, SGLang's) when they are
imported (a meta-path hook, so importing this costs nothing and no engine is imported early); `bench_serve --routing
spread` turns it on in every server process.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

DUMMY_LOADER = "vllm.model_executor.model_loader.dummy_loader"
SGLANG_LOADER = "sglang.srt.model_loader.loader"  # its `DummyModelLoader` calls the `initialize_dummy_weights` here
LOADERS = (DUMMY_LOADER, SGLANG_LOADER)
BIAS_NAME = "expert_bias"  # the router's selection bias: ours (`gate.expert_bias`) and vLLM's Bailing twin's


def zero_expert_bias(model) -> int:
    """Zero every parameter or buffer named `expert_bias` in `model`; how many there were."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    found = [t for name, t in tensors if name.rsplit(".", 1)[-1] == BIAS_NAME]
    for tensor in found:
        tensor.data.zero_()
    return len(found)


def unit_logit_scale(weight) -> float:
    """The factor that gives a dummy-filled router unit-deviation logits: a token's logit is a sum of D products of
    its normed activation (the dummy norm weight's RMS, the same fill as this weight's) with a weight row, so its
    deviation is about sqrt(D) * rms(weight)^2."""
    rms = float(weight.detach().float().pow(2).mean().sqrt())
    return 1.0 / (weight.shape[-1] ** 0.5 * rms * rms) if rms > 0 else 1.0


def scale_routers(model) -> int:
    """Scale every router weight in `model` (a module's `weight` beside an `expert_bias`) to unit-deviation logits;
    how many there were."""
    found = [m for m in model.modules() if hasattr(m, BIAS_NAME) and getattr(m, "weight", None) is not None]
    for module in found:
        module.weight.data.mul_(unit_logit_scale(module.weight))
    return len(found)


def patch(dummy_loader, scaled: bool = False) -> None:
    """Make an engine's dummy fill leave the selection biases at zero (and, `scaled`, the routers' logits at unit
    deviation, once per router): vLLM 0.26 and SGLang fill a module's state dict at a time (`initialize_dummy_weights`,
    which vLLM 0.26 calls for every module, each call refilling its descendants before this scales them), vLLM 0.33 one
    tensor of one module at a time by its local name (`initialize_single_dummy_weight(..., name=)`), so there the whole
    model's routers are scaled after `DummyModelLoader.load_weights`."""
    whole = getattr(dummy_loader, "initialize_dummy_weights", None)
    single = getattr(dummy_loader, "initialize_single_dummy_weight", None)
    if whole is not None:

        def initialize_then_spread(model, *args, **kwargs):
            whole(model, *args, **kwargs)
            zero_expert_bias(model)
            if scaled:
                scale_routers(model)

        dummy_loader.initialize_dummy_weights = initialize_then_spread
    if single is not None:

        def initialize_one_then_spread(tensor, *args, **kwargs):
            single(tensor, *args, **kwargs)
            if kwargs.get("name", "").rsplit(".", 1)[-1] == BIAS_NAME:
                tensor.data.zero_()

        dummy_loader.initialize_single_dummy_weight = initialize_one_then_spread
    loader_class = getattr(dummy_loader, "DummyModelLoader", None)
    if scaled and whole is None and loader_class is not None:
        load_weights = loader_class.load_weights

        def load_then_scale(self, model, *args, **kwargs):
            load_weights(self, model, *args, **kwargs)
            scale_routers(model)

        loader_class.load_weights = load_then_scale
    if whole is None and single is None:
        print(f"spread_routing: {dummy_loader.__name__} has neither fill function this hook knows; routing is left "
              "as the dummy fill makes it (every token on the same experts)", file=sys.stderr)  # fmt: skip


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, scaled: bool = False) -> None:
        self.name, self.scaled = name, scaled

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # find the real module, then patch it once it has run
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                patch(module, self.scaled)

            spec.loader.exec_module = exec_and_patch
        return spec


def install(scaled: bool = False) -> None:
    """Patch each engine's dummy loader now if it is imported, else when it is."""
    for name in LOADERS:
        if name in sys.modules:
            patch(sys.modules[name], scaled)
        elif not any(isinstance(finder, _PatchOnImport) and finder.name == name for finder in sys.meta_path):
            sys.meta_path.insert(0, _PatchOnImport(name, scaled))
