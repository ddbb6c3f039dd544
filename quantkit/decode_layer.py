"""Decode layers on quantkit's CPU kernels (quantkit.native): a whole GPT-NeoX layer of a decode step per kernel call.

At a few rows a GPT-NeoX layer's products are only part of its cost: transformers' module spends about as much again
on small torch ops (layer norms, rotary slices and concatenations, cache copies, the attention call, GELU, residual
adds) and the Python between them. `DecodeLayer` sends the rows of a decode step (one new token per sequence: one
row, or up to 16) through layer.c once, over the same weights as the layer's DecodeLinear products
and the same PreallocatedLayer cache; every other input (prefill, larger batches) runs the layer as it is.
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

from quantkit import native
from quantkit.decode_linear import DecodeLinear
from quantkit.kv_cache import PreallocatedLayer


class DecodeLayer(torch.nn.Module):
    """`layer` (a GPTNeoXLayer whose four linears are DecodeLinear) with the decode steps its products take on
    layer.c."""

    def __init__(self, layer: GPTNeoXLayer, config: PretrainedConfig) -> None:
        super().__init__()
        self.layer = layer
        attention = layer.attention
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        # fp32 copies the struct points to (the linears' weights stay alive in `layer`'s DecodeLinear modules)
        self.norm_parameters = [p.detach().float().contiguous() for norm in norms for p in (norm.weight, norm.bias)]
        self.struct = native.Layer(
            *(native.linear_struct(linear.weight, linear.bias) for linear in linears_of(layer)),
            *(p.data_ptr() for p in self.norm_parameters),
            config.hidden_size, config.num_attention_heads, attention.head_size, attention.rotary_ndims,
            norms[0].eps, attention.scaling,
        )
        self.new_tokens = torch.empty(1, config.num_attention_heads, 1, attention.head_size, dtype=torch.bfloat16)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                layer_past: Cache | None = None, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs) -> torch.Tensor:
        cache = layer_past.layers[self.layer.attention.layer_idx] if layer_past is not None else None
        if (not self.takes(hidden_states) or not isinstance(cache, PreallocatedLayer) or not cache.is_initialized
                or self.layer.training or torch.compiler.is_compiling()):
            return self.layer(hidden_states, attention_mask=attention_mask, layer_past=layer_past,
                              position_embeddings=position_embeddings, **kwargs)
        rows = hidden_states.shape[0]
        cos, sin = (part.to(torch.bfloat16).expand(rows, 1, -1).contiguous() for part in position_embeddings)
        if attention_mask is not None:
            end = cache.get_seq_length() + 1
            attention_mask = attention_mask[:, 0, -1, :end].to(torch.bfloat16).expand(rows, -1).contiguous()
        return self.step(hidden_states, cos, sin, attention_mask, cache)

    def step(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
             cache: PreallocatedLayer) -> torch.Tensor:
        """The layer on the rows `takes` accepts, over an initialized cache: cos, sin [rows, 1, rotary dims] and the
        additive mask [rows, >= cached + 1] (or None), bf16 and contiguous."""
        new_tokens = self.new_tokens.expand(hidden_states.shape[0], -1, -1, -1)
        position = cache.extend(new_tokens, new_tokens)
        return native.decode_layer(self.struct, hidden_states, cos, sin, cache.key_buffer, cache.value_buffer,
                                   position, mask)

    def takes(self, hidden_states: torch.Tensor) -> bool:
        """One new token per row, and rows every one of the layer's products takes."""
        return hidden_states.shape[1] == 1 and all(
            native.takes_rows(hidden_states, linear.weight.shape[0]) for linear in linears_of(self.layer))


def linears_of(layer: GPTNeoXLayer) -> tuple[torch.nn.Module, ...]:
    """The layer's four linears in layer.c's order: qkv, dense, fc1, fc2."""
    attention, mlp = layer.attention, layer.mlp
    return attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h


def fits(layer: torch.nn.Module, config: PretrainedConfig) -> bool:
    """Whether layer.c runs this layer: GPT-NeoX with parallel residual, exact GELU, heads attention.c takes, equal
    layer-norm eps, and its four linears on quantkit's products."""
    if not isinstance(layer, GPTNeoXLayer) or not layer.use_parallel_residual or config.hidden_act != "gelu":
        return False
    attention = layer.attention
    return (all(isinstance(linear, DecodeLinear) for linear in linears_of(layer))
            and native.attention_fits(attention.head_size, attention.rotary_ndims)
            and layer.input_layernorm.eps == layer.post_attention_layernorm.eps)


def use_decode_layers(model: torch.nn.Module) -> int:
    """Wrap every GPT-NeoX layer of `model` that layer.c runs in DecodeLayer; returns how many."""
    layers = getattr(getattr(model, "gpt_neox", None), "layers", None)
    if layers is None:
        return 0
    count = 0
    for index, layer in enumerate(layers):
        if fits(layer, model.config):
            layers[index] = DecodeLayer(layer, model.config)
            count += 1
    return count
