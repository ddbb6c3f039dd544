"""quantkit's CPU decode kernels swapped into a loaded model: DecodeLinear products, then DecodeLayer."""
from __future__ import annotations

from pathlib import Path

import torch

from quantkit import native
from quantkit.decode_layer import use_decode_layers
from quantkit.decode_linear import use_decode_linears


def use_decode_kernels(model: torch.nn.Module, gptq_folder: Path | None = None) -> int:
    """Swap the linears the products take (a GPTQ folder's 4-bit layers, every bf16 nn.Linear), then the GPT-NeoX
    layers whose linears all run on them; returns how many modules were swapped. Nothing changes where the kernels
    cannot run (a model not on the CPU, no AVX512-BF16, QUANTKIT_NATIVE=0)."""
    if not native.available() or next(model.parameters()).device.type != "cpu":
        return 0
    return use_decode_linears(model, gptq_folder) + use_decode_layers(model)
