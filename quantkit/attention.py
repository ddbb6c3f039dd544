"""fp32 attention for GPT-NeoX, registered with transformers' AttentionInterface as "fp32".

GPT-NeoX overflows in fp16 attention: transformers' eager path multiplies q and k in the model dtype and only the
softmax runs in fp32, and SDPA gives no such guarantee on every backend. This function upcasts q and k, so scores,
mask and softmax are fp32 on every device and in the exported ONNX graph; only the probability-weighted sum of v
runs in the model dtype.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

ATTN_IMPLEMENTATION = "fp32"


def fp32_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """softmax(q·kᵀ·scaling + mask) · v with fp32 scores; returns [batch, seq, heads, head_dim]."""
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]].float()
    probs = scores.softmax(dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, fp32_attention)
# The additive float mask (0 / dtype-min) of the eager path, never skipped, so left padding always applies.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)
