"""vLLM adapter for Ring-linear-2.0 (not yet implemented: see the vLLM adapter issue).

The package exists so the distribution layout is fixed; it exports nothing until `register()` and
the model file land together.
"""

__all__: list[str] = []
