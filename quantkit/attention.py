"""fp32 attention for GPT-NeoX, registered with transformers' AttentionInterface as "fp32".

GPT-NeoX overflows in fp16 attention: transformers' eager path multiplies q and k in the model dtype and only the
softmax runs in fp32, and SDPA gives no such guarantee on every backend. Here scores, mask and softmax are fp32 on
every device and in the exported ONNX graph:

- on CPU (eager), one call to PyTorch's CPU flash-attention kernel, which accumulates q·kᵀ, the softmax and the
  probability-weighted sum of v in fp32 for bf16/fp16 inputs. It is asked for by name, so a call it cannot take
  fails instead of falling back to a kernel without that guarantee. It replaces a dozen small ops per layer and
  the fp32 copy of the whole K cache that every decode step made;
- elsewhere (CUDA, and while torch.export traces the ONNX graph), explicit ops: q and k upcast, fp32 scores, mask
  and softmax, then the probabilities cast to the model dtype for the sum of v.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
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
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if query.device.type == "cpu" and not torch.compiler.is_compiling():
        out = fused_cpu_attention(query, key, value, attention_mask, scaling)
    else:
        out = explicit_fp32_attention(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def fused_cpu_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """[batch, heads, seq, head_dim] through the CPU flash-attention kernel (fp32 accumulation)."""
    if mask is not None:
        mask = mask.to(query.dtype)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def explicit_fp32_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """[batch, heads, seq, head_dim] from upcast q and k: the ops the ONNX graph and CUDA run."""
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1).to(value.dtype)
    return torch.matmul(probs, value)


AttentionInterface.register(ATTN_IMPLEMENTATION, fp32_attention)
# The additive float mask (0 / dtype-min) of the eager path, never skipped, so left padding always applies.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)
