"""Shared fixtures: the trained tiny model, the real StableLM tokenizer, a 3B-shaped model cut to 2 layers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantkit.backends.pytorch import TorchBackend
from quantkit.paths import data_dir
from quantkit.sources import STABLELM_TOKENIZER, load_model, load_tokenizer

torch.set_num_threads(2)

# `make test` runs files on two workers (--dist loadfile) in collection order: the files with the longest cold runs
# go first, so the short ones fill the end instead of one worker finishing a long file alone (measured cold on a
# 2-core Xeon, summed from --durations: test_tiny about 255 s, most of it training the tiny-stablelm variant;
# test_gptq 250 s, test_recipes 180 s, test_onnx 155 s, test_onnx_int4, test_best and test_faults 85-95 s each).
LONGEST_FIRST = ("test_tiny.py", "test_gptq.py", "test_recipes.py", "test_onnx.py", "test_onnx_int4.py", "test_best.py",
                 "test_faults.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def shared_data():
    folder = data_dir(required=False)
    if folder is None:
        pytest.skip("../shared/data is absent (set QUANTKIT_DATA to the shared data folder)")
    return folder


@pytest.fixture(scope="session")
def stablelm_tokenizer(shared_data):
    return load_tokenizer(shared_data / STABLELM_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_backend() -> TorchBackend:
    model, tokenizer = load_model("tiny", dtype=torch.float32, device="cpu")
    return TorchBackend(model, tokenizer, name="torch-fp32")


@pytest.fixture(scope="session")
def tiny_onnx_fp32(tmp_path_factory) -> Path:
    """The tiny model as a validated fp32 ONNX artifact, exported once per session: treat it as read-only."""
    from quantkit.export.onnx import OnnxOptions, export_onnx

    return export_onnx("tiny", tmp_path_factory.mktemp("onnx") / "tiny-fp32", OnnxOptions(dtype="fp32", device="cpu"))


@pytest.fixture(scope="session")
def neox3b_2layer_backend() -> TorchBackend:
    """The real 3B width, heads, rotary_pct and 50688 vocab rows, random weights, 2 layers."""
    model, tokenizer = load_model("stablelm-3b:layers=2", dtype=torch.float32, device="cpu")
    return TorchBackend(model, tokenizer, name="torch-fp32")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch, tiny_backend):
    """An empty cache (reference log-probs, kernels); the tiny model is committed, so it needs none."""
    fresh = tmp_path / "cache"
    fresh.mkdir()
    monkeypatch.setenv("QUANTKIT_CACHE", str(fresh))
