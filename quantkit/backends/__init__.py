"""Pick the backend for a `--model` value: ONNX folder, GPTQ folder, or anything the PyTorch path loads."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quantkit.backends.base import Backend
from quantkit.backends.pytorch import TorchBackend
from quantkit.decode_kernels import use_decode_kernels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def artifact_kind(spec: str) -> str:
    """'onnx', 'gptq' or 'torch' for what a spec points at."""
    folder = Path(spec)
    if (folder / "model.onnx").is_file():
        return "onnx"
    config = folder / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return "gptq"
    return "torch"


def open_backend(spec: str, dtype: str | None = None, device: str | None = None, native_kernels: bool = True
                 ) -> Backend:
    """The runner backend for `spec`; `dtype` (fp32/fp16/bf16) applies to the PyTorch path; `native_kernels`: decode
    steps (batch 1 to 16) of bf16/GPTQ models on quantkit's CPU kernels where they run
    (quantkit.decode_kernels)."""
    kind = artifact_kind(spec)
    if kind == "onnx":
        from quantkit.backends.onnxrt import OnnxBackend

        return OnnxBackend(Path(spec), device=device)
    if kind == "gptq":
        from quantkit.backends.gptq import open_gptq

        return open_gptq(Path(spec), device=device, native_kernels=native_kernels)
    from quantkit.sources import load_model

    torch_dtype = DTYPES[dtype] if dtype else None
    model, tokenizer = load_model(spec, dtype=torch_dtype, device=device)
    label = {v: k for k, v in DTYPES.items()}[model.dtype]
    if native_kernels:
        use_decode_kernels(model)
    return TorchBackend(model, tokenizer, name=f"torch-{label}")
