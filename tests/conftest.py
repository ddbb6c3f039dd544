"""Shared fixtures: the trained tiny model, the real StableLM tokenizer, a 3B-shaped model cut to 2 layers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantkit.backends.pytorch import TorchBackend
from quantkit.paths import data_dir
from quantkit.sources import STABLELM_TOKENIZER, load_model, load_tokenizer
from quantkit.tiny import tiny_folder

torch.set_num_threads(2)


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
    """An empty cache (reference log-probs, kernels) that still holds the trained tiny model, as a link: training it
    again would cost ~100 s."""
    tiny = tiny_folder("own")
    fresh = tmp_path / "cache"
    fresh.mkdir()
    (fresh / tiny.name).symlink_to(tiny)
    monkeypatch.setenv("QUANTKIT_CACHE", str(fresh))
