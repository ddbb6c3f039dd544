"""Batch-1 decode linears on quantkit's CPU kernels (quantkit.native), swapped into a loaded model.

A decode step at batch 1 multiplies one row by every weight, and there the kernels read weights faster than torch's
bf16 F.linear and gptqmodel's int4 kernel (benchmarks/gemv_bench.py); every other shape (prefill, batch > 1) runs
the layer that was there, where oneDNN/AMX and gptqmodel's kernels do well. Only CPU bf16 models are touched: the
int4 layers of 4-bit GPTQ checkpoints without act-order, and bf16 nn.Linear layers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from quantkit import native


class DecodeLinear(torch.nn.Module):
    """`layer` for every input but one bf16 row, which goes to `product` (same weights, fp32 sums)."""

    def __init__(self, layer: torch.nn.Module, product: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.layer = layer
        self.product = product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.one_row(x) and not torch.compiler.is_compiling():
            return self.product(x)
        return self.layer(x)


def fp32_bias(layer: torch.nn.Module) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().float().contiguous()


def bf16_product(linear: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor] | None:
    weight = linear.weight.detach()
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.shape[1] % 32:
        return None
    weight, bias = weight.contiguous(), fp32_bias(linear)
    return lambda x: native.bf16_linear(x, weight, bias)


def gptq_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each quantized layer's qweight, qzeros and scales from a GPTQ folder's safetensors files, by layer name."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as tensors:
            for key in tensors.keys():
                name, _, kind = key.rpartition(".")
                if kind in ("qweight", "qzeros", "scales"):
                    layers.setdefault(name, {})[kind] = tensors.get_tensor(key)
    return layers


def swap(model: torch.nn.Module, products: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    for name, product in products.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, DecodeLinear(getattr(owner, child), product))


def use_decode_kernels(model: torch.nn.Module, gptq_folder: Path | None = None) -> int:
    """Swap the layers the kernels take (the GPTQ folder's int4 layers, every bf16 nn.Linear) for DecodeLinear;
    returns how many. Nothing changes where the kernels cannot run (a model not on the CPU, no AVX512-BF16,
    QUANTKIT_NATIVE=0)."""
    if not native.available() or next(model.parameters()).device.type != "cpu":
        return 0
    products = {name: product for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and (product := bf16_product(module)) is not None}
    if gptq_folder is not None:
        quantization = json.loads((gptq_folder / "config.json").read_text())["quantization_config"]
        if quantization["bits"] == 4 and not quantization.get("desc_act"):
            modules = dict(model.named_modules())
            for name, tensors in gptq_tensors(gptq_folder).items():
                layer = modules.get(name)
                if layer is None or not native.packable(layer.in_features, layer.out_features,
                                                        quantization["group_size"]):
                    continue
                weight = native.pack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                          quantization["group_size"])
                products[name] = lambda x, w=weight, b=fp32_bias(layer): native.int4_linear(x, w, b)
    swap(model, products)
    return len(products)
