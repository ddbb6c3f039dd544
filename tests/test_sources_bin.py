"""Checkpoints as published: one small random StableLM-shaped model saved as safetensors, as sharded PyTorch
pickles with an index and as one pickle exports to the same GPTQ tensors and ONNX logits; a pickle that asks for
more than tensors is refused by name before anything runs; pinned revisions; the source in the manifest."""
from __future__ import annotations

import builtins
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from quantkit.backends.onnxrt import OnnxBackend
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.export.gptq import GptqOptions, export_gptq
from quantkit.export.onnx import OnnxOptions, export_onnx
from quantkit.recipe import load_recipe
from quantkit.sources import RandomShape, announce_pickles, build_random, model_folder, with_revision

SHAPE = RandomShape(hidden=64, layers=2, heads=4, vocab_rows=8064)  # rows for the tiny model's 8000-token tokenizer
SAVES = ("safetensors", "sharded-bin", "single-bin")
PICKLE_NOTE = "read by torch.load(weights_only=True)"
GPTQ = GptqOptions(group_size=32, calib=("tiny-train",), calib_samples=8, calib_seqlen=64, device="cpu")
ONNX = OnnxOptions(dtype="fp32", device="cpu")


class Payload:
    """Unpickling this opens (creates) `marker`: what a hostile checkpoint would do with os.system instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def folder_with(base: Path, name: str) -> Path:
    """A new folder holding `base`'s config and tokenizer files, no weights."""
    folder = base.parent / name
    folder.mkdir()
    for path in base.iterdir():
        if path.suffix == ".json":
            shutil.copy2(path, folder / path.name)
    return folder


def save_sharded_pickles(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """The April-2023 hub layout: pytorch_model-0000N-of-00002.bin and pytorch_model.bin.index.json."""
    names = list(tensors)
    shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        torch.save({key: tensors[key] for key in keys}, folder / file)
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> dict[str, Path]:
    """The same seeded random model saved three ways, each with the tiny model's tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    safetensors = root / "safetensors"
    build_random(SHAPE, None, torch.float32, "cpu").save_pretrained(safetensors)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(model_folder("tiny") / name, safetensors / name)
    tensors = load_file(safetensors / "model.safetensors")
    sharded, single = folder_with(safetensors, "sharded-bin"), folder_with(safetensors, "single-bin")
    save_sharded_pickles(tensors, sharded)
    torch.save(tensors, single / "pytorch_model.bin")
    return {"safetensors": safetensors, "sharded-bin": sharded, "single-bin": single}


@pytest.fixture(scope="module")
def gptq_exports(saves, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gptq")
    return {name: export_gptq(str(folder), out / name, GPTQ) for name, folder in saves.items()}


@pytest.fixture(scope="module")
def onnx_exports(saves, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("onnx")
    return {name: export_onnx(str(folder), out / name, ONNX) for name, folder in saves.items()}


def test_three_saves_give_byte_identical_gptq_tensors(gptq_exports):
    reference = load_file(gptq_exports["safetensors"] / "model.safetensors")
    assert any(name.endswith(".qweight") for name in reference)
    for name in SAVES[1:]:
        tensors = load_file(gptq_exports[name] / "model.safetensors")
        assert tensors.keys() == reference.keys()
        for key, tensor in reference.items():
            assert tensor.dtype == tensors[key].dtype and torch.equal(tensor, tensors[key]), key
        assert not list(gptq_exports[name].glob("*.bin"))  # artifacts are safetensors, whatever the source


def test_three_saves_give_the_same_onnx_logits(onnx_exports, saves):
    ids = torch.tensor([[5, 17, 300, 2048, 3999, 42, 7]])
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    logits = {}
    for name, folder in onnx_exports.items():
        backend = OnnxBackend(folder, device="cpu")
        logits[name] = backend.forward(ids, positions, mask, backend.new_cache(1), last_only=False)[0]
        assert json.loads((folder / "quantkit.json").read_text())["validation"]["passed"]
    assert logits["safetensors"].abs().max() > 0
    for name in SAVES[1:]:
        assert (logits[name] - logits["safetensors"]).abs().max().item() <= 1e-6


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name, weights_format", [("safetensors", "safetensors"),
                                                  ("sharded-bin", "pytorch-pickle")])
def test_manifest_records_the_source_and_verify_shows_it(gptq_exports, onnx_exports, saves, name, weights_format,
                                                         capsys):
    expected = {path.name: sha256_of(path) for path in saves[name].iterdir()
                if path.suffix in (".bin", ".safetensors")}
    for artifact in (gptq_exports[name], onnx_exports[name]):
        source = json.loads((artifact / "quantkit.json").read_text())["source"]
        assert source == {"model": str(saves[name]), "folder": str(saves[name].resolve()),
                          "weights_format": weights_format, "weights_sha256": expected}
    assert main(["verify", str(gptq_exports[name])]) == 0
    out = capsys.readouterr().out
    assert f"source: folder {saves[name].resolve()}" in out
    assert all(f"{file} sha256 {digest}" in out for file, digest in expected.items())


def generate_json(capsys, model: str) -> tuple[int, dict | None, str]:
    code = main(["generate", "--model", model, "--prompt", "Explain the assert statement.", "--greedy",
                 "--max-new-tokens", "6", "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def test_pickles_load_with_one_line_saying_so(saves, capsys):
    _, expected, err = generate_json(capsys, str(saves["safetensors"]))
    assert PICKLE_NOTE not in err
    for name in SAVES[1:]:
        announce_pickles.cache_clear()  # once per folder and process: the exports above may have said it already
        code, record, err = generate_json(capsys, str(saves[name]))
        assert code == 0 and record["token_ids"] == expected["token_ids"]
        assert [line for line in err.splitlines() if PICKLE_NOTE in line] == [
            f"note: {saves[name]} has PyTorch pickle weights and no safetensors: {PICKLE_NOTE}, which rebuilds "
            "tensors only"]


@pytest.fixture
def hostile(saves, tmp_path) -> tuple[Path, Path, Path]:
    """(folder, its hostile shard, the marker that shard's pickle would create): the sharded save with shard 2
    carrying a payload beside its tensors."""
    folder = tmp_path / "hostile"
    shutil.copytree(saves["sharded-bin"], folder)
    shard = folder / "pytorch_model-00002-of-00002.bin"
    marker = tmp_path / "marker"
    torch.save({**torch.load(shard, weights_only=True), "payload": Payload(marker)}, shard)
    return folder, shard, marker


@pytest.mark.parametrize("command", [["export", "--fmt", "gptq", "--method", "rtn"], ["export", "--fmt", "onnx"],
                                     ["generate", "--prompt", "hi"]])
def test_a_pickle_asking_for_more_than_tensors_is_refused(hostile, tmp_path, capsys, command):
    folder, shard, marker = hostile
    out = tmp_path / "out"
    code = main([*command, "--model", str(folder), *(["--out", str(out)] if command[0] == "export" else [])])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1] == (f"error: refused {shard}: its pickle asks for more than tensors "
                                    "(Unsupported global: GLOBAL io.open); nothing in it was run")
    assert not marker.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((out.name, f".{out.name}"))]
    torch.load(shard, weights_only=False)  # the payload is live: the unsafe loader runs it
    assert marker.exists()


def test_safetensors_are_preferred_over_pickles(saves, hostile, capsys):
    folder, shard, marker = hostile
    shutil.copy2(saves["safetensors"] / "model.safetensors", folder)
    code, _, err = generate_json(capsys, str(folder))
    assert code == 0 and PICKLE_NOTE not in err and not marker.exists()


def test_hub_id_without_internet_is_one_line_naming_it(capsys):
    code, _, err = generate_json(capsys, "quantkit-tests/no-such-model")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: could not fetch 'quantkit-tests/no-such-model' from the Hugging Face hub: ")


def test_revision_pins_hub_ids_only(saves, tmp_path, capsys):
    assert with_revision("stabilityai/stablelm-tuned-alpha-3b", "abc123") == "stabilityai/stablelm-tuned-alpha-3b@abc123"
    assert main(["generate", "--model", str(saves["safetensors"]), "--revision", "abc123", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == (f"error: a revision pins a hub id, and '{saves['safetensors']}' is a local "
                                       "folder or preset\n")
    with pytest.raises(QuantkitError, match="already names a revision"):
        with_revision("org/model@v1", "v2")


def test_recipe_revision_is_validated(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[source]\nmodel = "stabilityai/stablelm-tuned-alpha-3b"\nrevision = "v1.0"\n'
                      '[export]\nformat = "onnx"\n')
    assert load_recipe(recipe).source["revision"] == "v1.0"
    with pytest.raises(QuantkitError, match=r"r.toml: 'source.revision': a revision pins a hub id, and 'tiny'"):
        load_recipe(recipe, ["source.model=tiny"])
    with pytest.raises(QuantkitError, match=r"'source.revision' = 'v1@x' is out of range"):
        load_recipe(recipe, ['source.revision="v1@x"'])


def test_a_hub_source_is_one_resolved_commit_recorded_in_the_manifest(saves, monkeypatch):
    """The hub calls stand in for the network: the revision resolves to a commit, and the snapshot of that commit
    (here the single-pickle save) is what gets read and hashed."""
    import huggingface_hub

    from quantkit.export.artifact import source_lines
    from quantkit.sources import source_record

    commit = "0123456789abcdef0123456789abcdef01234567"
    calls = []

    def model_info(self, repo_id, revision=None):
        calls.append(("info", repo_id, revision))
        files = ["config.json", "pytorch_model.bin", "tokenizer.json"]
        return SimpleNamespace(sha=commit, siblings=[SimpleNamespace(rfilename=name) for name in files])

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append(("snapshot", repo_id, revision, allow_patterns))
        return str(saves["single-bin"])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    record = source_record("quantkit-tests/pinned@v1.0")
    assert calls == [("info", "quantkit-tests/pinned", "v1.0"),
                     ("snapshot", "quantkit-tests/pinned", commit, ["*.json", "*.txt", "pytorch_model*.bin"])]
    digest = sha256_of(saves["single-bin"] / "pytorch_model.bin")
    assert record == {"model": "quantkit-tests/pinned@v1.0", "hub_id": "quantkit-tests/pinned", "revision": "v1.0",
                      "commit": commit, "weights_format": "pytorch-pickle",
                      "weights_sha256": {"pytorch_model.bin": digest}}
    assert source_lines({"source": record}) == [
        f"source: hub quantkit-tests/pinned at commit {commit} (revision v1.0)",
        f"source weights (pytorch-pickle): pytorch_model.bin sha256 {digest}"]
