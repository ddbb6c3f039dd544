"""Every bad input is one line: each row is a command with one bad input, the message it must print and its exit
code. No row may raise out of `main`, print a traceback or leave a file behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from quantkit.cli import main
from quantkit.sources import model_folder

LONG_PROMPT = " ".join(["Explain the assert statement and the with statement."] * 40)  # ~400 tokens on tiny


def rename_graph_input(model_file: Path, old: str, new: str) -> None:
    """The graph of another exporter: the same model, with `old` taking another name."""
    model = onnx.load(model_file, load_external_data=False)
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
    next(i for i in model.graph.input if i.name == old).name = new
    onnx.save(model, model_file)


def onnx_copy(cases: Path, name: str, source: Path, change) -> None:
    shutil.copytree(source, cases / name)
    change(cases / name)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_onnx_fp32) -> Path:
    """One folder of bad inputs, built once; rows must leave it exactly as they found it."""
    root = tmp_path_factory.mktemp("cases")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    (root / "empty.txt").write_text("")
    (root / "blank.jsonl").write_text("\n  \n")
    (root / "not-gzip.jsonl.gz").write_text('{"prompt": "a", "completion": "b"}\n')
    (root / "folder.txt").mkdir()
    (root / "regular-file").write_text("a file, so no folder can be created under it")
    (root / "missing-model.toml").write_text(
        f'name = "missing"\n[source]\nmodel = "{root / "no-such-model"}"\n[export]\nformat = "onnx"\n')
    (root / "tiny.toml").write_text('name = "tiny"\n[source]\nmodel = "tiny"\n[export]\nformat = "onnx"\n')
    onnx_copy(root, "onnx-truncated", tiny_onnx_fp32, lambda f: os.truncate(f / "model.onnx.data", 1000))
    onnx_copy(root, "onnx-no-data", tiny_onnx_fp32, lambda f: (f / "model.onnx.data").unlink())
    onnx_copy(root, "onnx-no-position-ids", tiny_onnx_fp32,
              lambda f: rename_graph_input(f / "model.onnx", "position_ids", "positions"))
    shutil.copytree(model_folder("tiny"), root / "torch-no-weights")
    (root / "torch-no-weights" / "model.safetensors").unlink()
    # The bits check runs before any weight is read, so the tiny model's folder with a GPTQ config is enough.
    gptq = root / "gptq-5bit"
    shutil.copytree(model_folder("tiny"), gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 5, "group_size": 32, "desc_act": False,
                                     "sym": True, "checkpoint_format": "gptq"}
    (gptq / "config.json").write_text(json.dumps(config))
    return root


# An output path in a read-only place: the tests run as root, for whom chmod'ed folders stay writable, so the
# path goes under a regular file, where no user can create a folder (ENOTDIR).
ROWS = {
    "non-UTF-8 text": ("eval --model tiny --data {c}/binary.txt", "binary.txt is not UTF-8 text", 2),
    "empty text": ("eval --model tiny --data {c}/empty.txt", "dataset is empty", 2),
    "blank records": ("eval --model tiny --data {c}/blank.jsonl", "dataset is empty", 2),
    "not gzip": ("eval --model tiny --data {c}/not-gzip.jsonl.gz", "is not a complete gzip file", 2),
    "data is a folder": ("eval --model tiny --data {c}/folder.txt", "folder.txt is a folder, not a file", 2),
    "recipe's model missing": ("run {c}/missing-model.toml --out {c}/out --results {c}/results",
                               "model folder not found", 2),
    "window past positions": ("eval --model tiny --data tiny-heldout --window 100000",
                              "window 100000 exceeds the model's 256 positions", 2),
    "window 0": ("eval --model tiny --data tiny-heldout --window 0", "--window: must be >= 1, got 0", 2),
    "stride past window": ("eval --model tiny --data tiny-heldout --window 64 --stride 64",
                           "stride must be in 1..63", 2),
    "stride 0": ("eval --model tiny --data tiny-heldout --stride 0", "--stride: must be >= 1, got 0", 2),
    "batches 0": ("bench --model tiny --batches 0", "--batches: must be >= 1, got 0", 2),
    "best on a preset": ("bench --model tiny --best", "--best needs an artifact or model folder as --model: tiny", 2),
    "best with a reference": ("bench --model {c} --best --reference tiny", "--best compares the paths of one folder", 2),
    "negative max-new-tokens": ("generate --model tiny --prompt hi --max-new-tokens -3",
                                "--max-new-tokens: must be >= 1, got -3", 2),
    "max-new-tokens past positions": ("generate --model tiny --prompt hi --max-new-tokens 300",
                                      "+ max_new_tokens 300 = 400 exceed the model's 256 positions", 2),
    "prompt past positions": ("generate --model tiny --prompt LONG --fit-context",
                              "leave no room for a new token in the model's 256 positions", 2),
    "unknown device": ("generate --model tiny --prompt hi --device tpu", "unknown device 'tpu'", 2),
    "unknown export device": ("export --fmt onnx --model tiny --out {c}/out --device gpu0", "unknown device 'gpu0'", 2),
    "weights truncated": ("generate --model {c}/onnx-truncated --prompt hi --device cpu",
                          "ONNX Runtime could not load", 2),
    "weights missing (ONNX)": ("generate --model {c}/onnx-no-data --prompt hi --device cpu",
                               "ONNX Runtime could not load", 2),
    "weights missing (PyTorch)": ("generate --model {c}/torch-no-weights --prompt hi", "has no weights (expected *.safetensors, or pytorch_model*.bin)", 2),
    "GPTQ bits 5": ("generate --model {c}/gptq-5bit --prompt hi --device cpu", "quantization_config bits is 5", 2),
    "ONNX without position_ids": ("generate --model {c}/onnx-no-position-ids --prompt hi --device cpu",
                                  "lacks the inputs position_ids", 2),
    "export under a file": ("export --fmt onnx --model tiny --out {c}/regular-file/out --no-validate",
                            "cannot create the output folder", 2),
    "report under a file": ("report --models tiny --name t --results {c}/regular-file/results --data tiny-heldout",
                            "cannot create the output folder", 2),
    "run under a file": ("run {c}/tiny.toml --out {c}/regular-file/out", "cannot create the output folder", 2),
}


def argv(command: str, cases: Path) -> list[str]:
    return [LONG_PROMPT if word == "LONG" else word.format(c=cases) for word in command.split()]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


@pytest.mark.parametrize("command, message, code", ROWS.values(), ids=ROWS.keys())
def test_bad_input_is_one_line(cases, capsys, command, message, code):
    before = snapshot(cases)
    try:
        returned = main(argv(command, cases))
    except SystemExit as exc:  # argparse's usage errors exit from inside parse_args
        returned = exc.code
    err = capsys.readouterr().err
    *progress, line = err.rstrip("\n").split("\n")  # above it, at most the loaders' progress bars
    assert returned == code
    assert line.startswith("error: ") and message in line, err
    assert all(bar.startswith("\r") for bar in progress) and "Traceback" not in err, err
    assert snapshot(cases) == before  # nothing half-written, not even an empty folder


def test_console_prints_one_line_for_binary_data(cases):
    """Through the real entry point: the message, the exit code and no traceback on stderr."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "quantkit", "eval", "--model", "tiny", "--data",
                           str(cases / "binary.txt")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: dataset {cases / 'binary.txt'} is not UTF-8 text "
                                        "(byte 0: invalid start byte)"]
