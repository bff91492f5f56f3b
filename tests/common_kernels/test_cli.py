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


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common_kernels.cli", *args], capture_output=True, text=True)


def test_bad_input_gets_one_line_and_a_distinct_exit_status(tmp_path):
    main(["make-tiny", str(tmp_path / "tiny")])
    (tmp_path / "empty").mkdir()
    cases = [  # (arguments, exit status, words the one line must hold)
        (["generate", str(tmp_path / "nowhere"), "--prompt", "a"], 1, "no such checkpoint folder"),
        (["generate", str(tmp_path / "empty"), "--prompt", "a"], 1, "no config.json"),
        (["generate", str(tmp_path / "tiny"), "--prompt", "a!B"], 1, "'!', 'B' is not in this tokenizer's vocabulary"),
        (["train", str(tmp_path / "tiny"), "--out", str(tmp_path / "tiny")], 1, "already holds files"),
        (["make-tiny", str(tmp_path / "tiny")], 1, "already holds files"),
        (["generate", str(tmp_path / "tiny"), "--prompt", "a", "--temperature", "-1"], 2, "must be a number >= 0"),
        (["generate", str(tmp_path / "tiny"), "--prompt", "a", "--top-p", "0"], 2, "must be a number in (0, 1]"),
        (["generate", str(tmp_path / "tiny"), "--prompt", "a", "--seed", str(2**70)], 2, "an integer in [0, 2**63)"),
        (["train", str(tmp_path / "tiny"), "--out", str(tmp_path / "o"), "--steps", "x"], 2, "integer, got 'x'"),
        (["generate", str(tmp_path / "tiny"), "--prompt", "a", "--max-new-tokens", "-1"], 2, "must be an integer >= 0"),
        (["train", str(tmp_path / "tiny"), "--out", str(tmp_path / "o"), "--steps", "0"], 2, "positive integer"),
        (["train", str(tmp_path / "tiny"), "--out", str(tmp_path / "o"), "--minutes", "0"], 2, "must be a number > 0"),
    ]
    for args, status, words in cases:
        result = _run_cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == status, (args, result.stderr)
        assert words in lines[-1] and "Traceback" not in result.stderr, (args, result.stderr)
        assert status == 2 or len(lines) == 1, (args, result.stderr)  # argparse adds its usage line


def test_debug_shows_the_traceback(tmp_path):
    for args in (["--debug", "generate"], ["generate", "--debug"]):  # before or after the subcommand
        result = _run_cli(*args, str(tmp_path / "nowhere"), "--prompt", "a")
        assert result.returncode == 1 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


def test_an_unexpected_failure_is_one_line_too(tmp_path, monkeypatch, capsys):
    from common_kernels import cli

    def fail(args):
        raise RuntimeError("something deep went wrong")

    monkeypatch.setattr(cli, "_make_tiny", fail)
    assert cli.main(["make-tiny", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "ring-linear make-tiny: error: RuntimeError: something deep went wrong (--debug shows the traceback)"
    ]
