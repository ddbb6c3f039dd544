"""ONNX export (issue 4): ONNX Runtime against PyTorch, the graph contract, the artifact folder, CLI failures.

Each export runs once per module (fixtures); the checks below are written independently of the exporter's own
validation code, so a bug there cannot hide itself.
"""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from quantkit.backends import open_backend
from quantkit.backends.onnxrt import OnnxBackend, cuda_usable
from quantkit.backends.pytorch import TorchBackend
from quantkit.chat import Sampler, render_prompt
from quantkit.cli import main
from quantkit.formats import serving_problems
from quantkit.export import onnx as onnx_export
from quantkit.export import onnx_graph
from quantkit.export.artifact import verify
from quantkit.export.onnx import TOLERANCES, OnnxOptions, export_onnx
from quantkit.runner import generate, left_pad, positions
from quantkit.sources import load_model

QUESTIONS = ["Explain the assert statement.", "What does the with statement do?",
             "Tell me about integer literals and how Python parses them."]
STEPS = 32


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def tiny_fp32(tiny_onnx_fp32) -> Path:
    return tiny_onnx_fp32


@pytest.fixture(scope="module")
def tiny_fp16(exports) -> Path:
    return export_onnx("tiny", exports / "tiny-fp16", OnnxOptions(device="cpu"))


@pytest.fixture(scope="module")
def tiny_fp16_torch() -> TorchBackend:
    model, tokenizer = load_model("tiny", dtype=torch.float16, device="cpu")
    return TorchBackend(model, tokenizer, name="torch-fp16")


def encode(tokenizer, questions) -> list[list[int]]:
    return [tokenizer(render_prompt(q))["input_ids"] for q in questions]


def prefill_inputs(backend, prompts) -> tuple:
    """(input_ids, position_ids, attention_mask, empty cache) of a left-padded prefill."""
    ids, mask = left_pad(prompts, backend.tokenizer.pad_token_id or 0, "cpu")
    return ids, positions(mask), mask, backend.new_cache(len(prompts))


def greedy(backend, prompts, steps=STEPS) -> list[list[int]]:
    results = generate(backend, prompts, steps, Sampler(vocab_limit=len(backend.tokenizer)), stop_ids=[])
    return [r.token_ids for r in results]


def teacher_forced(backend, prompts, tokens: list[torch.Tensor] | None = None):
    """Logits of the prefill (real positions) and of STEPS decode steps; greedy unless `tokens` are given.
    Returns (list of logits tensors, tokens fed)."""
    ids, position, mask, cache = prefill_inputs(backend, prompts)
    logits, cache = backend.forward(ids, position, mask, cache, last_only=False)
    seen, fed = [logits[mask.bool()]], []
    position = position[:, -1:]
    for step in range(STEPS):
        token = logits[:, -1].argmax(-1) if tokens is None else tokens[step]
        fed.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        logits, cache = backend.forward(token[:, None], position, mask, cache)
        seen.append(logits[:, -1])
    return seen, fed


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_fp32_logits_match_pytorch(tiny_fp32, tiny_backend):
    onnx_backend = OnnxBackend(tiny_fp32, device="cpu")
    for prompts in (encode(tiny_backend.tokenizer, QUESTIONS[:1]), encode(tiny_backend.tokenizer, QUESTIONS)):
        expected, tokens = teacher_forced(tiny_backend, prompts)
        actual, _ = teacher_forced(onnx_backend, prompts, tokens)
        assert max_diff(actual, expected) <= 1e-4


def test_fp32_greedy_equals_pytorch_runner_and_padding_is_invisible(tiny_fp32, tiny_backend):
    onnx_backend = OnnxBackend(tiny_fp32, device="cpu")
    prompts = encode(tiny_backend.tokenizer, QUESTIONS)
    assert len({len(p) for p in prompts}) == 3  # really left-padded
    solo = greedy(onnx_backend, prompts[:1])
    assert solo == greedy(tiny_backend, prompts[:1])
    batch = greedy(onnx_backend, prompts)
    assert batch == greedy(tiny_backend, prompts)
    assert batch[0] == solo[0]  # the most padded row equals its solo run


def test_fp16_matches_pytorch_fp16(tiny_fp16, tiny_fp16_torch):
    onnx_backend = OnnxBackend(tiny_fp16, device="cpu")
    assert onnx_backend.name == "onnx-fp16" and onnx_backend.new_cache(2)[0].dtype == torch.float16
    for prompts in (encode(tiny_fp16_torch.tokenizer, QUESTIONS[:1]), encode(tiny_fp16_torch.tokenizer, QUESTIONS)):
        assert greedy(onnx_backend, prompts) == greedy(tiny_fp16_torch, prompts)
        expected, tokens = teacher_forced(tiny_fp16_torch, prompts)
        actual, _ = teacher_forced(onnx_backend, prompts, tokens)
        assert all(torch.isfinite(t).all() for t in actual)
        scale = max(t.abs().max().item() for t in expected)
        assert max_diff(actual, expected) <= TOLERANCES["fp16"].limit(scale)


def test_graph_names_and_dynamic_axes(tiny_fp16):
    graph = onnx.load(tiny_fp16 / "model.onnx", load_external_data=False).graph
    layers = json.loads((tiny_fp16 / "config.json").read_text())["num_hidden_layers"]
    kv = [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids", *kv]
    assert [o.name for o in graph.output] == ["logits"] + [n.replace("past_key_values", "present") for n in kv]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == ["batch", "seq"] and dims["past_key_values.0.key"] == ["batch", 4, "past", 64]
    types = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    assert types["logits"] == onnx.TensorProto.FLOAT and types["present.1.value"] == onnx.TensorProto.FLOAT16
    # Every weight is in the one sidecar, by a relative path.
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}


def test_artifact_folder_manifest_and_card(tiny_fp16):
    names = {p.name for p in tiny_fp16.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json",
            "README.md", "quantkit.json"} <= names
    assert verify(tiny_fp16) == []
    manifest = json.loads((tiny_fp16 / "quantkit.json").read_text())
    validation = manifest["validation"]
    assert manifest["format"] == "onnx" and manifest["options"]["dtype"] == "fp16"
    assert validation["passed"] and [c["batch"] for c in validation["cases"]] == [1, 3]
    assert all(c["steps"] == STEPS + 1 and c["finite"] for c in validation["cases"])
    assert 0 < validation["max_abs_diff"] <= validation["cases"][0]["limit"]
    config = json.loads((tiny_fp16 / "config.json").read_text())
    assert config["rotary_pct"] == 0.25 and config["model_type"] == "gpt_neox"
    card = (tiny_fp16 / "README.md").read_text()
    assert "ORTModelForCausalLM" in card and "InferenceSession" in card and "**Passed.**" in card


def test_loads_from_another_folder_and_working_directory(tiny_fp32, tmp_path, monkeypatch, tiny_backend):
    shutil.copytree(tiny_fp32, tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    backend = open_backend("../moved")
    assert isinstance(backend, OnnxBackend) and backend.device == "cpu"
    assert [i.name for i in backend.session.get_inputs()][:3] == ["input_ids", "attention_mask", "position_ids"]
    prompts = encode(backend.tokenizer, QUESTIONS[:1])
    assert greedy(backend, prompts, 4) == greedy(tiny_backend, prompts, 4)


def test_backend_figures(tiny_fp32, tiny_backend):
    backend = OnnxBackend(tiny_fp32)
    assert (backend.name, backend.vocab_rows, backend.max_positions) == (
        "onnx-fp32", tiny_backend.vocab_rows, tiny_backend.max_positions)
    # The torch figure also counts the 64-byte rotary buffer, which ONNX keeps inside model.onnx.
    assert abs(backend.decode_weight_bytes - tiny_backend.decode_weight_bytes) <= 1024


def test_cuda_request_without_cuda_provider_warns_and_runs_on_cpu(tiny_fp32):
    if cuda_usable():
        pytest.skip("CUDA is usable here")
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider"):
        backend = OnnxBackend(tiny_fp32, device="cuda")
    assert backend.device == "cpu"


@pytest.mark.slow
def test_stablelm_3b_shape_exports_validates_and_runs(exports):
    """Real 3B width, 32 heads of 128, rotary_pct 0.25, 50688 vocab rows; 1 layer, random weights (~620M
    parameters: fp32, since PyTorch's fp16 reference is slow on CPU). Greedy equality with PyTorch is part of
    the validation record, checked here, rather than a second PyTorch run."""
    folder = export_onnx("stablelm-3b:layers=1", exports / "3b-1layer", OnnxOptions(dtype="fp32", device="cpu"))
    validation = json.loads((folder / "quantkit.json").read_text())["validation"]
    assert validation["passed"] and validation["max_abs_diff"] <= 1e-4
    assert all(c["finite"] and c["greedy_equal_steps"] + len(c["near_ties"]) >= c["steps"] == STEPS + 1
               for c in validation["cases"])
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_attention_heads"], config["rotary_pct"], config["vocab_size"]) == (32, 0.25, 50688)
    backend = OnnxBackend(folder, device="cpu")
    assert backend.vocab_rows == 50688 and (backend.heads, backend.head_dim, backend.layers) == (32, 128, 1)
    assert len(greedy(backend, encode(backend.tokenizer, QUESTIONS[:1]), 4)[0]) == 4


# ---- the command line: one-line errors, nothing left behind --------------------------------------------------


def run_export(capsys, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["export", "--fmt", "onnx", "--out", str(out), *extra])
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, out: Path, message: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()  # transformers' weight-loading progress bar may come before the error
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert sum(line.startswith("error") for line in lines) == 1
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())  # no staging folder left


def test_cli_unsupported_architecture(capsys, tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "out"
    code, err = run_export(capsys, out, "--model", str(llama))
    assert_clean_failure(code, err, out, "unsupported architecture 'llama'")
    assert not out.exists()


def test_cli_refuses_existing_output_without_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_export(capsys, out, "--model", "tiny")
    assert_clean_failure(code, err, out, "output folder exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_validation_failure_publishes_nothing(capsys, tmp_path, monkeypatch, tiny_fp32):
    """A real artifact with a corrupted weight block: the real reference and ORT runs must catch it."""

    def write_corrupt_copy(source, folder, options):
        for path in tiny_fp32.iterdir():
            if path.name not in ("README.md", "quantkit.json"):
                shutil.copy(path, folder / path.name)
        data = folder / "model.onnx.data"
        size = data.stat().st_size
        with data.open("r+b") as handle:
            handle.seek(size // 2)
            handle.write(bytes(size // 50))  # zeros over 2 % of the weights

    monkeypatch.setattr(onnx_export, "write_model_files", write_corrupt_copy)
    out = tmp_path / "out"
    code, err = run_export(capsys, out, "--model", "tiny", "--dtype", "fp32", "--device", "cpu")
    assert_clean_failure(code, err, out, "ONNX validation failed")
    assert not out.exists()


def test_cli_disk_write_failure(capsys, tmp_path, monkeypatch):
    def full_disk(config, dtype, opset, read, folder):
        (folder / "model.onnx.data").write_bytes(bytes(1024))  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_graph, "export_graph", full_disk)
    out = tmp_path / "out"
    code, err = run_export(capsys, out, "--model", "tiny", "--device", "cpu")
    assert_clean_failure(code, err, out, "No space left on device")
    assert not out.exists()


# ---- what onnxruntime / ORTModelForCausalLM expect of the folder (quantkit.downstream) ----

def rename_input(folder: Path, old: str, new: str) -> None:
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
    next(i for i in model.graph.input if i.name == old).name = new
    onnx.save(model, folder / "model.onnx")


ONNX_BREAKAGES = {
    "sidecar lost": (lambda f: (f / "model.onnx.data").unlink(), "external data model.onnx.data: missing"),
    "input renamed": (lambda f: rename_input(f, "position_ids", "positions"),
                      "inputs: missing ['position_ids'], unexpected ['positions']"),
    "config has one layer more": (
        lambda f: edit_json(f / "config.json", lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1)),
        "inputs: missing ['past_key_values.{layers}.key', 'past_key_values.{layers}.value']"),
    "genai config lost": (lambda f: (f / "genai_config.json").unlink(), "genai_config.json: missing"),
    "genai config names other cache inputs": (
        lambda f: edit_json(f / "genai_config.json",
                            lambda c: c["model"]["decoder"]["inputs"].update(past_key_names="past.%d.key")),
        "decoder.inputs.past_key_names is 'past.%d.key'"),
    "genai config stops elsewhere": (
        lambda f: edit_json(f / "genai_config.json", lambda c: c["model"].update(eos_token_id=[0])),
        "model.eos_token_id is [0]"),
    "chat template lost": (lambda f: edit_json(f / "tokenizer_config.json", lambda c: c.pop("chat_template")),
                           "chat_template is not the StableLM prompt format"),
}


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_genai_config_describes_the_graph(tiny_fp32):
    genai = json.loads((tiny_fp32 / "genai_config.json").read_text())
    config = json.loads((tiny_fp32 / "config.json").read_text())
    graph = onnx.load(tiny_fp32 / "model.onnx", load_external_data=False).graph
    decoder = genai["model"]["decoder"]
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    for layer in range(decoder["num_hidden_layers"]):
        for pattern in (*decoder["inputs"].values(), *decoder["outputs"].values()):
            assert (pattern % layer if "%d" in pattern else pattern) in names
    assert decoder["num_hidden_layers"] == config["num_hidden_layers"]
    assert decoder["head_size"] * decoder["num_attention_heads"] == config["hidden_size"]
    assert genai["model"]["vocab_size"] == config["vocab_size"]
    assert genai["model"]["eos_token_id"] == json.loads((tiny_fp32 / "generation_config.json").read_text())["eos_token_id"]
    assert genai["model"]["context_length"] == config["max_position_embeddings"]
    assert genai["search"]["do_sample"] is False


def test_serving_contract_holds(tiny_fp16, tiny_fp32):
    assert serving_problems(tiny_fp16, "onnx") == [] and serving_problems(tiny_fp32, "onnx") == []


@pytest.mark.parametrize("breakage", ONNX_BREAKAGES)
def test_serving_contract_names_each_breakage(tiny_fp32, tmp_path, breakage):
    broken = shutil.copytree(tiny_fp32, tmp_path / "broken")
    edit, message = ONNX_BREAKAGES[breakage]
    message = message.replace("{layers}", str(json.loads((broken / "config.json").read_text())["num_hidden_layers"]))
    edit(broken)
    problems = serving_problems(broken, "onnx")
    assert any(message in p for p in problems), problems
