"""`quantkit bench --best` on the tiny model: every engine path of the artifact is tried, the exported ones are
validated by their exporters (a failing one is reported and not timed), and `best` is the fastest measured."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.export import onnx_int4
from quantkit.export.artifact import read_manifest
from quantkit.export.gptq import GptqOptions, export_gptq
from quantkit import native
from quantkit.export.onnx import Tolerance
from quantkit.tiny import tiny_folder

# Where quantkit's one-row CPU kernels run, the GPTQ and bf16 paths are tried without them too.
WITHOUT_KERNELS = native.available()
GPTQ_PATHS = {"gptq", "onnx-int4-fp32", "onnx-int4-fp32-a4"} | ({"gptq-library-kernels"} if WITHOUT_KERNELS else set())
DENSE_PATHS = {"torch-bf16", "torch-fp32", "onnx-fp32"} | ({"torch-bf16-library-kernels"} if WITHOUT_KERNELS else set())


@pytest.fixture(scope="module")
def rtn_folder(tmp_path_factory) -> Path:
    return export_gptq("tiny", tmp_path_factory.mktemp("gptq") / "rtn", GptqOptions(method="rtn", device="cpu"))


def best(capsys, folder: Path, *batches: str) -> dict:
    code = main(["bench", "--model", str(folder), "--best", "--device", "cpu", "--batches", *batches,
                 "--decode-tokens", "8", "--repeats", "1", "--bandwidth-gbs", "10", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    return json.loads(out)


def test_best_tries_each_validated_path_and_names_the_fastest(capsys, rtn_folder):
    record = best(capsys, rtn_folder, "1", "2")
    paths = record["paths"]
    assert set(paths) == GPTQ_PATHS
    for name in GPTQ_PATHS & {"gptq", "gptq-library-kernels"}:
        assert paths[name]["backend"] == "gptq-4bit"
        assert paths[name]["validation"] == read_manifest(rtn_folder)["validation"]
    for name in GPTQ_PATHS - {"gptq", "gptq-library-kernels"}:
        assert paths[name]["backend"] == "onnx-int4"
        assert paths[name]["validation"]["passed"] is True
        assert paths[name]["validation"]["reference"].startswith("gptq-dequantized-float32")
    for batch in ("1", "2"):
        speeds = {name: path["decode"][batch]["median"] for name, path in paths.items()}
        assert all(speed > 0 for speed in speeds.values())
        assert record["best_by_batch"][batch] == max(speeds, key=speeds.get)
    assert record["best"] == record["best_by_batch"]["1"]


def test_a_path_that_fails_validation_is_reported_not_timed(capsys, rtn_folder, monkeypatch):
    monkeypatch.setattr(onnx_int4, "INT8_ACTIVATIONS", Tolerance(atol=0.0, rtol=0.0))  # W4A8 cannot be exact
    record = best(capsys, rtn_folder, "1")
    failed = record["paths"]["onnx-int4-fp32-a4"]
    assert "validation failed" in failed["error"] and "decode" not in failed
    assert record["best"] in GPTQ_PATHS - {"onnx-int4-fp32-a4"}


def test_best_on_a_dense_folder_tries_both_torch_dtypes_and_the_validated_onnx_export(capsys):
    folder = tiny_folder() / "model"  # the committed tiny model: a plain fp16 safetensors folder
    record = best(capsys, folder, "1")
    paths = record["paths"]
    assert set(paths) == DENSE_PATHS
    assert all(paths[name]["backend"] == name for name in ("torch-bf16", "torch-fp32"))  # named by the model's dtype
    assert paths["onnx-fp32"]["validation"]["passed"] is True
    speeds = {name: path["decode"]["1"]["median"] for name, path in paths.items()}
    assert all(speed > 0 for speed in speeds.values()) and record["best"] == max(speeds, key=speeds.get)
