import json
import os
import platform
import random
import subprocess
import time
import urllib.request
from pathlib import Path

# Before NumPy loads OpenBLAS: Triton's CPU interpreter multiplies each `tl.dot` tile with NumPy, and OpenBLAS's
# Haswell kernels (its choice on AMD Zen CPUs, and what this project's CPU machines preset in OPENBLAS_CORETYPE) sum a
# row differently by its position in the tile, which a GPU's MMA does not: the batch-invariance tests would then fail
# for the emulation's sake. Its Sandybridge (AVX) kernels keep a row's sum independent of its place, as the GPU does.
if platform.machine() in ("x86_64", "AMD64"):
    os.environ["OPENBLAS_CORETYPE"] = "Sandybridge"

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run on the CPU through the interpreter when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> Path:
    """The trained tiny checkpoint of the engines' GPU tests: RING_LINEAR_TINY_CHECKPOINT (e.g. `ring-linear
    demo`'s), else one trained here (600 steps)."""
    given = os.environ.get("RING_LINEAR_TINY_CHECKPOINT")
    if given:
        return Path(given)
    from common_kernels.tiny.train import make_tiny_checkpoint, train

    path = tmp_path_factory.mktemp("tiny-trained")
    make_tiny_checkpoint(path / "init")
    train(path / "init", path / "trained", steps=600)
    return path / "trained"


@pytest.fixture(scope="session")
def recall_prompts():
    """`recall_prompts(tokenizer, n, seed=0)`: recall prompts of 2-12 pairs (12-70 tokens), the trained task and
    longer variants, as token ids."""
    from common_kernels.tiny.task import make_sample

    def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
        rng = random.Random(seed)
        return [
            tokenizer(make_sample(rng, num_pairs=rng.randint(2, 12), num_queries=2).prompt).input_ids for _ in range(n)
        ]

    return prompts


@pytest.fixture
def openai_completion(tmp_path):
    """`openai_completion(command, model)`: start an engine's OpenAI server (`command` plus `--port`), wait for its
    `/health` (10 min at most), ask for one greedy 4-token completion with logprobs, stop the server; returns the
    reply's first choice. A server that exits early fails with the tail of its log."""

    def complete(command: list[str], model: str) -> dict:
        from common_kernels.testing import free_port  # imported here: the package must see TRITON_INTERPRET first

        port = free_port()
        log_path = tmp_path / "server.log"
        with log_path.open("w") as log:
            server = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 600
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "the server did not come up"
                time.sleep(2)
            body = {"model": model, "prompt": "a1 b2 c3|b:", "max_tokens": 4, "temperature": 0, "logprobs": 1}
            url, headers = f"http://127.0.0.1:{port}/v1/completions", {"Content-Type": "application/json"}
            request = urllib.request.Request(url, json.dumps(body).encode(), headers)
            with urllib.request.urlopen(request, timeout=60) as reply:
                return json.loads(reply.read())["choices"][0]
        finally:
            server.terminate()
            server.wait(60)

    return complete


@pytest.fixture(scope="session")
def greedy_partings():
    """`greedy_partings(shim, prompts, got, want)`: where each engine continuation first parts from the shim's,
    (prompt index, position, logit margin, router margin), printed: the shim's logprob of its token minus that of
    the engine's token, and the smallest `selection_margin` of any MoE layer there. A parting is a near-tie that
    rounding may flip when either margin is within the engines' error; wide margins at a parting are a fault."""

    def router_margins(shim) -> tuple[list[float], list]:
        found, c = [], shim.config

        def record(module, args, _out) -> None:
            found.append(module.selection_margin(args[0][-1:]).item())

        layers = [layer.mlp for l, layer in enumerate(shim.model.layers) if c.is_moe_layer(l)]
        return found, [mlp.register_forward_hook(record) for mlp in layers]

    def partings(shim, prompts: list[list[int]], got: list[list[int]], want: list[list[int]]) -> list[tuple]:
        found = []
        for n, (prompt, g, w) in enumerate(zip(prompts, got, want, strict=True)):
            if g == w:
                continue
            at = next(i for i, (a, b) in enumerate(zip(g, w, strict=True)) if a != b)
            margins, hooks = router_margins(shim)
            try:
                with torch.no_grad():
                    logits = shim(torch.tensor(prompt + w[:at], device=shim.device))[-1]
            finally:
                for hook in hooks:
                    hook.remove()
            logprobs = torch.log_softmax(logits.float(), -1)
            margin, router = (logprobs[w[at]] - logprobs[g[at]]).item(), min(margins, default=float("inf"))
            print(f"  prompt {n} parted at token {at}: shim's logit margin {margin:.1e}, router margin {router:.1e}")  # noqa: T201
            found.append((n, at, margin, router))
        return found

    return partings


_STAND_IN_ROUTERS = """
import torch

class Gate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(8, 4))
        self.register_buffer("expert_bias", torch.zeros(8))

model = torch.nn.ModuleDict({"gate": Gate(), "twin_gate": torch.nn.Linear(4, 8)})
model.twin_gate.expert_bias = torch.nn.Parameter(torch.zeros(8))
"""
_FILLED = """
assert model.gate.weight.abs().max() > 0 and model.twin_gate.weight.abs().max() > 0
scaled = all(float(gate.weight.abs().max()) > 1e-2 for gate in (model.gate, model.twin_gate))  # the fill: 1e-3 at most
print("biases", float(model.gate.expert_bias.abs().max()), float(model.twin_gate.expert_bias.abs().max()), end="; ")
print("routers scaled" if scaled else "routers as filled")
"""


@pytest.fixture(scope="session")
def biases_after_dummy_fill():
    """`biases_after_dummy_fill(fill, switch)`: in a fresh process with `bench_serve`'s server hooks on its path and
    the spread-routing switch set to `switch`, two stand-in routers (ours keeps `expert_bias` as a buffer, the
    Bailing twin's as a parameter) filled by `fill`, Python code that fills `model` as an engine's dummy loader does;
    the line naming both biases' largest magnitude and whether both routers' weights were scaled (the other weights
    must come out filled)."""
    import sys

    from benchmarks import bench_serve

    def run(fill: str, switch: str) -> str:
        env = bench_serve.routing_env(dict(os.environ), "spread") | {"RING_LINEAR_SPREAD_ROUTING": switch}
        script = _STAND_IN_ROUTERS + fill + _FILLED
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    return run
