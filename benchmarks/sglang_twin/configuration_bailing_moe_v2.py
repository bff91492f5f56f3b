"""The softmax twin's config for SGLang's native `BailingMoeV2ForCausalLM`: SGLang has no config class for
`bailing_moe_v2` and reads Ring-mini-2.0's from the hub's remote code, which the offline GPU machine cannot reach.
`bench_serve` copies this file beside the twin's `config.json` (`auto_map`, `--trust-remote-code`). Every field of
the file becomes an attribute; RoPE is described as transformers 5 does (`rope_parameters`), which SGLang reads.
"""

from transformers import PretrainedConfig


class BailingMoeV2Config(PretrainedConfig):
    model_type = "bailing_moe_v2"

    def __init__(self, rope_theta: float = 600000.0, rope_scaling: dict | None = None, **kwargs) -> None:
        self.rope_theta = rope_theta
        self.rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
        super().__init__(**kwargs)
