"""Hooks for every Python process of a benchmarked engine (API server, engine core, workers): `bench_serve` puts
this folder on the server's PYTHONPATH, and each hook runs only where its environment variable asks for it."""

import os

if os.environ.get("RING_LINEAR_PROCESS_PROBE"):
    import process_probe  # noqa: F401  (samples this process from import on)

if os.environ.get("RING_LINEAR_SPREAD_ROUTING") in ("1", "scaled"):
    import spread_routing

    spread_routing.install(scaled=os.environ["RING_LINEAR_SPREAD_ROUTING"] == "scaled")

if os.environ.get("RING_LINEAR_SYNC_WATCH"):
    import sync_watch  # noqa: F401  (counts the calls that wait for the GPU once bench_serve says the server is ready)
