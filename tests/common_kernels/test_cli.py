import json
import shutil
import subprocess
import sys

import torch

from common_kernels import RingLinearForCausalLM
from common_kernels.cli import main


def test_make_train_generate(tmp_path, capsys):
    main(["make-tiny", str(tmp_path / "init")])
    files = sorted(p.name for p in (tmp_path / "init").iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files and "config.json" in files
    assert len([f for f in files if f.startswith("model-")]) >= 2

    main(["train", str(tmp_path / "init"), "--out", str(tmp_path / "trained"), "--steps", "40", "--batch-size", "16"])
    report = capsys.readouterr().out
    assert "40 steps" in report
    first, last = (float(x) for x in report.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < first - 1.0  # the loss visibly falls, even in 40 steps

    before = RingLinearForCausalLM.from_pretrained(tmp_path / "init")
    after = RingLinearForCausalLM.from_pretrained(tmp_path / "trained")
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)

    main(["generate", str(tmp_path / "trained"), "--prompt", "a1 b2|a:", "--prompt", "c3", "--max-new-tokens", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("'a1 b2|a:' -> ")


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("ring-linear")
    cmd = [exe] if exe else [sys.executable, "-m", "common_kernels.cli"]
    out = subprocess.run([*cmd, "make-tiny", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "wrote a random tiny" in out.stdout
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bailing_moe_linear"
