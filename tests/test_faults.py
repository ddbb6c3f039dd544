"""Faults lose nothing: a full disk mid-export, a table write that fails, two `quantkit run` on one --out.
(A SIGKILL mid-export is in test_recipes.py.)"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.export import onnx_graph
from quantkit.export.artifact import verify
from quantkit.paths import atomic_write

ONNX_RECIPE = """
name = "shared"
[source]
model = "tiny"
dtype = "fp32"
[export]
format = "onnx"
dtype = "fp32"
validate = false
[eval]
data = "tiny-heldout[:3000]"
window = 128
stride = 96
kld_tokens = 200
[bench]
prompt_lengths = [16]
batches = [1]
decode_tokens = 2
repeats = 1
"""


def test_full_disk_during_export_leaves_nothing_then_rerun_completes(tmp_path, capsys, monkeypatch):
    real_export_graph = onnx_graph.export_graph

    def fills_the_disk(config, dtype, opset, read, folder):
        (folder / onnx_graph.DATA_FILE).write_bytes(bytes(4096))  # part of the weights, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    command = ["export", "--fmt", "onnx", "--model", "tiny", "--out", str(out), "--dtype", "fp32", "--no-validate"]
    monkeypatch.setattr(onnx_graph, "export_graph", fills_the_disk)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor its staging folder

    monkeypatch.setattr(onnx_graph, "export_graph", real_export_graph)  # space freed: the same command completes
    assert main(command) == 0
    assert verify(out) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_table_write_keeps_the_previous_file(tmp_path):
    table = tmp_path / "table.png"
    table.write_bytes(b"previous")

    def full_disk(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(table, full_disk)
    assert table.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["table.png"]


def test_two_concurrent_runs_on_one_out_run_each_stage_once(tmp_path):
    """Both finish with a verified artifact; the lock makes one wait, so every stage ran exactly once over the two,
    and stages.json holds all of them."""
    recipe = tmp_path / "shared.toml"
    recipe.write_text(ONNX_RECIPE)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    command = [sys.executable, "-m", "quantkit", "run", str(recipe), "--out", str(out),
               "--results", str(tmp_path / "results")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for _ in range(2)]
    logs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    assert verify(out / "shared" / "artifact") == []
    assert sum(log.count(": running") for log in logs) == 5  # reference eval/bench, then export/eval/bench
    assert any("waiting for another quantkit run" in log for log in logs)
    assert set(json.loads((out / "shared" / "stages.json").read_text())) == {"export", "eval", "bench"}
    assert not list(out.rglob("*.tmp*"))
