"""The command line: generate --json, and one-line errors for bad --model values."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from quantkit.cli import main
from quantkit.sources import model_folder


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_json_record(capsys):
    code, out, _ = run_cli(capsys, "generate", "--model", "tiny", "--prompt", "Explain the assert statement.",
                           "--greedy", "--max-new-tokens", "8", "--json")
    assert code == 0
    record = json.loads(out)
    assert record["prompt"].startswith("<|SYSTEM|># StableLM Tuned") and record["prompt"].endswith(
        "<|USER|>Explain the assert statement.<|ASSISTANT|>")
    assert record["prompt_ids"][-1] == record["prompt_ids"][record["prompt_ids"].index(record["prompt_ids"][-1])]
    assert 0 < len(record["token_ids"]) <= 8
    assert record["stop_reason"] in {"length", "stop_token"}
    assert (record["stop_reason"] == "length") == (len(record["token_ids"]) == 8 and record["stop_token"] is None)
    assert record["timings"]["decode_tok_s"] > 0 and record["timings"]["ttft_s"] > 0


def corrupt_folder(tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(model_folder("tiny"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def non_neox_folder(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def no_config_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "does-not-exist", "model folder not found"),
        (no_config_folder, "has no config.json"),
        (non_neox_folder, "unsupported architecture 'llama'"),
        (corrupt_folder, "could not load weights"),
    ],
)
def test_bad_model_gives_one_line_error(capsys, tmp_path, make, message):
    folder = make(tmp_path)
    code, out, err = run_cli(capsys, "generate", "--model", str(folder), "--prompt", "hi")
    assert code != 0
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1


def test_console_exit_code_for_bad_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "quantkit", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model folder not found: {tmp_path / 'nope'}"]


def test_model_config_without_weights():
    from quantkit.sources import load_model_config

    config = load_model_config("stablelm-3b:layers=2")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size) == (
        4096, 2, 32, 50688)
    assert load_model_config("tiny:layers=1").num_hidden_layers == 1
    assert load_model_config("tiny").num_hidden_layers == json.loads(
        (model_folder("tiny") / "config.json").read_text())["num_hidden_layers"]
