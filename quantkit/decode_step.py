"""A whole decode step of a GPT-NeoX model whose layers all run on layer.c, without transformers' model forward.

At a decode step GPTNeoXModel.forward builds the causal mask, the output objects and a module call per layer around
work that layer.c does in one call per layer; on the stablelm-200m GPTQ folder at batch 1 that model-level work was
about a sixth of the step (benchmarks/profile_gptq_decode.py). `decode_step` runs the same step on the model's own
modules: the embedding, the rotary table, each layer's DecodeLayer.step, the final layer norm and the head.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from quantkit.decode_layer import DecodeLayer
from quantkit.kv_cache import PreallocatedLayer


def decode_step(model: PreTrainedModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, cache: Cache) -> torch.Tensor | None:
    """The logits [rows, 1, vocab rows] of one new token per row (attention_mask [rows, cached + 1], 1 = attend),
    or None where a layer does not take the step (the caller then runs the model's forward)."""
    neox = getattr(model, "gpt_neox", None)
    if (neox is None or input_ids.shape[1] != 1 or model.training or torch.compiler.is_compiling()
            or not all(isinstance(layer, DecodeLayer) for layer in neox.layers)
            or not all(isinstance(layer, PreallocatedLayer) and layer.is_initialized for layer in cache.layers)):
        return None
    hidden = neox.embed_in(input_ids)
    if not all(layer.takes(hidden) for layer in neox.layers):
        return None
    cos, sin = (part.contiguous() for part in neox.rotary_emb(hidden, position_ids=position_ids))
    cached = cache.layers[0].get_seq_length()
    mask = torch.zeros(attention_mask.shape[0], cached + 1, dtype=torch.bfloat16)
    mask.masked_fill_(attention_mask[:, : cached + 1] == 0, torch.finfo(torch.bfloat16).min)
    for layer, layer_cache in zip(neox.layers, cache.layers):
        hidden = layer.step(hidden, cos, sin, mask, layer_cache)
    return model.get_output_embeddings()(neox.final_layer_norm(hidden))
