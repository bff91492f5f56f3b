"""Stands in for Hugging Face `datasets` where it is not installed (the offline GPU machine's SGLang bundle leaves it
out). `sglang.benchmark.serving` imports it at start-up for its MMMU dataset alone, which `bench_serve` never asks
for; any real use fails naming this stub."""


def load_dataset(*args, **kwargs):
    raise ModuleNotFoundError(
        "the Hugging Face `datasets` package is not installed; benchmarks/offline_stubs/datasets only lets SGLang's "
        "benchmark client start: install `datasets` to use its Hugging Face datasets"
    )
