"""Recipes: schema validation, `quantkit run` stages and resumption, kill safety, `quantkit verify`."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.export.artifact import verify
from quantkit.fingerprint import code_fingerprint
from quantkit.pipeline import export_fingerprint, reference_fingerprint, source_spec
from quantkit.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))

FAST_RECIPE = """
name = "{name}"
[source]
model = "tiny"
dtype = "fp32"
[export]
format = "gptq"
method = "rtn"
bits = 4
group_size = {group_size}
calib = ["tiny-train"]
calib_samples = 8
calib_seqlen = 64
[eval]
data = "tiny-heldout[:6000]"
window = 128
stride = 96
kld_tokens = 500
[bench]
prompt_lengths = [32]
batches = [1]
decode_tokens = 4
repeats = 1
"""


def test_every_shipped_recipe_validates():
    assert {p.stem for p in RECIPES} >= {
        "tiny-gptq-4bit", "tiny-rtn-4bit", "tiny-onnx-fp16",
        "stablelm-tuned-alpha-3b-gptq-4bit", "stablelm-tuned-alpha-3b-onnx-fp16",
        "stablelm-tuned-alpha-7b-gptq-4bit", "stablelm-tuned-alpha-7b-onnx-fp16",
    }
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.name == path.stem and recipe.source["model"]


@pytest.mark.parametrize("edit, message", [
    (("bits = 4", "bitz = 4"), "unknown key 'export.bitz'"),
    (("group_size = 32", 'group_size = "32"'), "'export.group_size' must be int"),
    (("bits = 4", "bits = 5"), "'export.bits' = 5 is out of range"),
    (("[bench]", "[benchmark]"), "unknown key 'benchmark'"),
])
def test_bad_recipe_names_the_key_and_the_file(tmp_path, capsys, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(FAST_RECIPE.format(name="bad", group_size=32).replace(*edit, 1))
    code = main(["run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path}: ") and message in err


@pytest.mark.parametrize("override, message", [
    ("export.bits=5", "'export.bits' = 5 is out of range"),
    ("eval.windw=64", "unknown key 'eval.windw'"),
    ("bench.batches=1", "'bench.batches' must be list"),
    ("bits=4", "expected SECTION.KEY=VALUE"),
])
def test_bad_override_names_the_key(tmp_path, capsys, override, message):
    path = tmp_path / "ok.toml"
    path.write_text(FAST_RECIPE.format(name="ok", group_size=32))
    code = main(["run", str(path), "--out", str(tmp_path / "out"), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


STAGE_RAN = re.compile(r"^\S+ +(export|eval|bench) +\d+\.\d s +\d+\.\d\d GiB  \S", re.MULTILINE)
STAGE_CACHED = re.compile(r"^\S+ +(export|eval|bench) +up to date \(", re.MULTILINE)


def ran(output: str) -> int:
    return len(STAGE_RAN.findall(output))


def cached(output: str) -> int:
    return len(STAGE_CACHED.findall(output))


def run_recipe(capsys, recipe: Path, out: Path, results: Path, *extra: str) -> str:
    assert main(["run", str(recipe), "--out", str(out), "--results", str(results), *extra]) == 0
    return capsys.readouterr().out


def test_run_produces_artifact_manifest_and_row_then_skips_then_reruns_what_changed(tmp_path, capsys):
    recipe = tmp_path / "fast.toml"
    recipe.write_text(FAST_RECIPE.format(name="fast", group_size=32))
    out, results = tmp_path / "out", tmp_path / "results"

    first = run_recipe(capsys, recipe, out, results)
    artifact = out / "fast" / "artifact"
    manifest = json.loads((artifact / "quantkit.json").read_text())
    assert verify(artifact) == [] and manifest["recipe"]["name"] == "fast"
    table = json.loads((results / "fast.json").read_text())
    assert [row["name"] for row in table["rows"]] == ["reference", "fast"]
    assert [set(row["stages"]) for row in table["rows"]] == [{"eval", "bench"}, {"export", "eval", "bench"}]
    assert all(figures["seconds"] > 0 and figures["peak_rss_bytes"] > 2**20
               for row in table["rows"] for figures in row["stages"].values())
    assert ran(first) == 2 + 3 and cached(first) == 0  # reference eval/bench, then export/eval/bench
    assert {p.name for p in (out / "fast").glob("*.log")} == {"export.log", "eval.log", "bench.log"}
    assert "GPT-QModel" not in first and "INFO " not in first  # gptqmodel's banner and logs are in the stage logs
    assert "GPT-QModel" in (out / "fast" / "export.log").read_text()

    second = run_recipe(capsys, recipe, out, results)
    assert ran(second) == 0 and cached(second) == 5

    third = run_recipe(capsys, recipe, out, results, "--set", "export.group_size=64")
    assert json.loads((results / "fast.json").read_text())["command"][-2:] == ["--set", "export.group_size=64"]
    assert ran(third) == 3 and cached(third) == 2  # the reference is untouched
    assert json.loads((artifact / "quantkit.json").read_text())["recipe"]["export"]["group_size"] == 64


def test_sigkill_during_export_leaves_nothing_then_rerun_completes(tmp_path):
    recipe = tmp_path / "kill.toml"
    recipe.write_text(FAST_RECIPE.format(name="kill", group_size=32))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "quantkit", "run", str(recipe), "--out", str(out),
               "--results", str(tmp_path / "results")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = out / "kill"
    deadline = time.time() + 300
    while not list(staging.glob(".artifact.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(staging.glob(".artifact.tmp-*")), "the export never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (staging / "artifact").exists()
    stages = staging / "stages.json"
    assert not stages.exists() or isinstance(json.loads(stages.read_text()), dict)  # never half-written

    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert verify(staging / "artifact") == []


def test_other_quantkit_code_makes_every_stage_stale(tmp_path, monkeypatch):
    """The export's and the reference's fingerprints (every later stage chains from them) follow quantkit's code."""
    recipe_file = tmp_path / "fast.toml"
    recipe_file.write_text(FAST_RECIPE.format(name="fast", group_size=32))
    recipe = load_recipe(recipe_file)
    before = export_fingerprint(recipe), reference_fingerprint(source_spec(recipe))
    assert (export_fingerprint(recipe), reference_fingerprint(source_spec(recipe))) == before
    monkeypatch.setattr("quantkit.pipeline.code_fingerprint", lambda: "other quantkit code")
    after = export_fingerprint(recipe), reference_fingerprint(source_spec(recipe))
    assert after[0] != before[0] and after[1] != before[1]


def test_code_fingerprint_follows_every_python_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    before = code_fingerprint.__wrapped__(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert code_fingerprint.__wrapped__(tmp_path) == before
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert code_fingerprint.__wrapped__(tmp_path) != before
    (tmp_path / "sub" / "b.py").rename(tmp_path / "b.py")
    (tmp_path / "b.py").write_text("y = 2\n")
    assert code_fingerprint.__wrapped__(tmp_path) not in {before, code_fingerprint()}  # a moved file counts too


def test_verify_detects_a_flipped_byte(tmp_path, capsys):
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "config.json").write_text("{}")
    from quantkit.export.artifact import write_manifest

    write_manifest(folder, {"format": "test"})
    assert main(["verify", str(folder)]) == 0
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[1000] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(folder)]) == 1
    assert "sha256 mismatch: model.safetensors" in capsys.readouterr().out
