"""GPTQ backend: a quantized artifact folder loaded through transformers (which hands the linears to gptqmodel's
kernels via optimum) and run by the shared PyTorch backend.

Activations are fp16 on CUDA and bf16 on CPU. On CPU gptqmodel picks TorchAtenLinear, whose fused
`aten._weight_int4pack_mm_for_cpu` is about 6x (one token) to 30x (128-token prefill) faster with bf16 than with
fp16 inputs on an AVX2 machine; fp32 inputs skip the fused kernel and dequantize the whole weight on every call.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTQConfig

from quantkit.attention import ATTN_IMPLEMENTATION  # importing it registers the "fp32" attention
from quantkit.backends.pytorch import TorchBackend
from quantkit.decode_kernels import use_decode_kernels
from quantkit.errors import QuantkitError
from quantkit.sources import default_device, first_line, load_tokenizer


BITS = (2, 3, 4, 8)  # the widths gptqmodel's kernels run


def activation_dtype(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.bfloat16


def kernel_override(quantization: dict, device: str) -> dict:
    """gptqmodel 7.7 picks its ATen int4 kernel on CPU for per-column groups too, and that kernel then fails on
    layers whose input width is not a group size it runs (32-256): use the plain torch kernel there."""
    if device.startswith("cuda") or quantization["group_size"] != -1:
        return {}
    return {"quantization_config": GPTQConfig(bits=quantization["bits"], backend="gptq_torch")}


def open_gptq(folder: Path, device: str | None = None, native_kernels: bool = True) -> TorchBackend:
    """The runner backend for a GPTQ artifact folder (config.json with quantization_config); `native_kernels`:
    decode steps (batch 1 to 16) on quantkit's CPU kernels where they run (quantkit.decode_kernels)."""
    device = device or default_device()
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    if quantization.get("bits") not in BITS:
        raise QuantkitError(f"{folder / 'config.json'}: quantization_config bits is {quantization.get('bits')!r}, "
                            f"expected one of {', '.join(map(str, BITS))}")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # gptqmodel logs to stdout, which is the answer's (--json)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=activation_dtype(device),
                device_map=device,
                attn_implementation=ATTN_IMPLEMENTATION,
                trust_remote_code=False,
                **kernel_override(quantization, device),
            )
    except Exception as exc:  # missing optimum/gptqmodel, corrupt tensors, unsupported kernel
        raise QuantkitError(f"could not load the GPTQ artifact {folder}: {first_line(exc)}") from None
    if native_kernels:
        use_decode_kernels(model, folder)
    return TorchBackend(model.eval(), load_tokenizer(folder), name=f"gptq-{quantization['bits']}bit")
