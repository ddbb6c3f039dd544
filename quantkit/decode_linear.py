"""Decode linears on quantkit's CPU kernels (quantkit.native), swapped into a loaded model.

A decode step at batch 1 multiplies one row by every weight, and there the kernels read weights faster than torch's
bf16 F.linear and gptqmodel's int4 kernel (benchmarks/gemv_bench.py); at a small batch (2-16 rows) gptqmodel's int4
kernel is bound by its arithmetic and oneDNN's bf16 call costs about as much to set up as the product, and rows.c's
products take those rows (on amx.c's tiles where the CPU has AMX). Where AMX runs, amx.c's int4 product also takes a
prefill's rows: a 128-token prefill of the stablelm-3b:layers=2 GPTQ folder took 108 ms there vs 149 ms on
gptqmodel's kernel (2-core Xeon, alternating calls, medians). Every other shape (bf16 prefills, more than 16 rows
without AMX) runs the layer that was there. Only CPU bf16 models are touched: the int4 layers of 4-bit GPTQ
checkpoints without act-order, and bf16 nn.Linear layers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit import native


class DecodeLinear(torch.nn.Module):
    """`layer` for every input but the bf16 rows quantkit's products take (`native.takes_rows`), which go to them
    with the same weights: `weight` (contiguous bf16 [N, K], or the layer's int4 codes as a PackedInt4) and `bias`
    (fp32 or None); fp32 sums."""

    def __init__(self, layer: torch.nn.Module, weight: torch.Tensor | native.PackedInt4,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.layer = layer
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.layer(x)
        int4 = isinstance(self.weight, native.PackedInt4)
        if not native.takes_rows(x, self.weight.shape[0], int4):
            return self.layer(x)
        if int4:
            return native.int4_linear(x, self.weight, self.bias)
        return native.bf16_linear(x, self.weight, self.bias)


def fp32_bias(layer: torch.nn.Module) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().float().contiguous()


def bf16_weight(linear: torch.nn.Linear) -> torch.Tensor | None:
    """The weight the bf16 product takes (bf16 on the CPU, K % 32 == 0), else None."""
    weight = linear.weight.detach()
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.shape[1] % 32:
        return None
    return weight.contiguous()


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


def swap(model: torch.nn.Module, weights: dict[str, torch.Tensor | native.PackedInt4]) -> None:
    for name, weight in weights.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, child)
        setattr(owner, child, DecodeLinear(layer, weight, fp32_bias(layer)))


def use_decode_linears(model: torch.nn.Module, gptq_folder: Path | None = None) -> int:
    """Swap the layers the products take (the GPTQ folder's int4 layers, every bf16 nn.Linear) for DecodeLinear;
    returns how many."""
    weights = {name: weight for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and (weight := bf16_weight(module)) is not None}
    if gptq_folder is not None:
        quantization = json.loads((gptq_folder / "config.json").read_text())["quantization_config"]
        if quantization["bits"] == 4 and not quantization.get("desc_act"):
            modules = dict(model.named_modules())
            for name, tensors in gptq_tensors(gptq_folder).items():
                layer = modules.get(name)
                if layer is None or not native.packable(layer.in_features, layer.out_features,
                                                        quantization["group_size"]):
                    continue
                weights[name] = native.pack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                                 quantization["group_size"])
    swap(model, weights)
    return len(weights)
