"""The classic (v1) GPTQ checkpoint layout read back in plain torch: unpacking, and the exact dequantized model.

  qweight int32 [K/8, N] (nibbles low-first along K), qzeros int32 [groups, N/8] (stored zero - 1),
  scales fp16 [groups, N], g_idx int32 [K];   W[k, n] = scales[g_idx[k], n] * (q[k, n] - (z[g_idx[k], n] + 1))

The dequantized model is the reference the int4 ONNX export is validated against: it computes with exactly the
checkpoint's weights and no quantized kernel in between (gptqmodel's CPU kernel runs in bf16, whose rounding
grows past any useful tolerance at 200M scale and above).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

from quantkit.export import onnx_graph
from quantkit.export.onnx import checkpoint_reader

BITS = 4


def unpack_nibbles(words: torch.Tensor, dim: int) -> torch.Tensor:
    """The 4-bit fields of int32 words, lowest first, laid out along `dim` (0 or 1), as uint8."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
    fields = (words.unsqueeze(dim + 1) >> shifts.view([-1 if d == dim + 1 else 1 for d in range(words.dim() + 1)])) & 0xF
    shape = list(words.shape)
    shape[dim] *= 32 // BITS
    return fields.reshape(shape).to(torch.uint8)


def quantized_prefixes(folder: Path) -> dict[str, Path]:
    """Checkpoint prefix (e.g. "gpt_neox.layers.0.mlp.dense_4h_to_h") -> file, for every quantized linear."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            found |= {key.removesuffix(".qweight"): file for key in handle.keys() if key.endswith(".qweight")}
    return found


def dequantize_linear(read: onnx_graph.WeightReader, prefix: str) -> torch.Tensor:
    """The fp32 weight [N, K] (nn.Linear's layout) of the quantized linear `prefix`."""
    q = unpack_nibbles(read(f"{prefix}.qweight"), 0)  # [K, N]
    zeros = unpack_nibbles(read(f"{prefix}.qzeros"), 1)[:, : q.shape[1]].float() + 1  # [groups, N]
    groups = read(f"{prefix}.g_idx").long()
    return ((q.float() - zeros[groups]) * read(f"{prefix}.scales").float()[groups]).t().contiguous()


def dequantized_model(folder: Path, dtype: torch.dtype, device: str) -> GPTNeoXForCausalLM:
    """The GPTQ folder as a plain GPTNeoXForCausalLM in `dtype`: quantized linears dequantized exactly (in fp32,
    then cast), every other tensor as stored."""
    config = GPTNeoXConfig.from_pretrained(folder)
    read = checkpoint_reader(folder)
    quantized = quantized_prefixes(folder)
    model = onnx_graph.meta_model(config, dtype)
    state = {}
    for name in model.state_dict():
        prefix = name.removesuffix(".weight")
        state[name] = (dequantize_linear(read, prefix) if prefix in quantized else read(name)).to(device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    with torch.device(device):
        model.gpt_neox.rotary_emb = GPTNeoXRotaryEmbedding(config)  # its buffers are not in checkpoints
    return model.eval()
