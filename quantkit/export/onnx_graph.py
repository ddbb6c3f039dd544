"""The ONNX graph contract of a GPT-NeoX causal LM, and the low-memory way to trace and save it.

One graph serves prefill and decode, with optimum's ORTModelForCausalLM names:
  inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64, position_ids [batch, seq] int64,
           past_key_values.{i}.key / .value [batch, heads, past, head_dim] (past may be 0)
  outputs  logits [batch, seq, vocab_rows] fp32, present.{i}.key / .value [batch, heads, past + seq, head_dim]
Weights and the KV cache are in the export dtype; attention scores and softmax are fp32 (quantkit.attention).

The model is traced on the meta device, so tracing needs no weights and no memory for them; each weight is read
from its source only while `save_graph` writes it to `model.onnx.data`, and freed right after.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterator

import onnx_ir as ir
import torch
from torch import nn
from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

from quantkit.attention import ATTN_IMPLEMENTATION  # importing it registers the "fp32" attention and mask

MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
WRAPPER_PREFIX = "model."  # the wrapper holds the LM as `self.model`, so graph weight names carry this prefix
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 3, 5

WeightReader = Callable[[str], torch.Tensor]  # checkpoint key (e.g. "embed_out.weight") -> tensor


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the graph, in order."""
    return [*INPUT_NAMES, *past_names(layers)], ["logits", *present_names(layers)]


class FlatCacheLM(nn.Module):
    """The LM with flat tensors in and out: transformers wants a Cache object, ONNX wants named tensors."""

    def __init__(self, model: GPTNeoXForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(past_key_values, config=self.model.config)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits.float(), *present)


def dynamic_shapes(layers: int) -> dict:
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=16384)
    past = torch.export.Dim("past", min=0, max=16384)
    # past + seq: torch.export rejects a Dim derived from two Dims; ORT does not check the relation anyway.
    total = torch.export.Dim("total", min=1, max=32768)
    kv = {0: batch, 2: past}
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": [(kv, kv) for _ in range(layers)],
    }


def meta_model(config: GPTNeoXConfig, dtype: torch.dtype) -> GPTNeoXForCausalLM:
    with torch.device("meta"):
        model = GPTNeoXForCausalLM._from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
    return model.eval()


def trace_inputs(config: GPTNeoXConfig, dtype: torch.dtype) -> tuple:
    """Meta example inputs: batch 2, 3 new tokens after 5 cached ones (no dimension is 0 or 1, so none specialises)."""
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    batch, seq, past = TRACE_BATCH, TRACE_SEQ, TRACE_PAST

    def kv() -> torch.Tensor:  # a new tensor each time: the exporter treats one object passed twice as aliased
        return torch.empty(batch, heads, past, head_dim, dtype=dtype, device="meta")

    return (
        torch.zeros(batch, seq, dtype=torch.long, device="meta"),
        torch.ones(batch, past + seq, dtype=torch.long, device="meta"),
        torch.zeros(batch, seq, dtype=torch.long, device="meta"),
        [(kv(), kv()) for _ in range(config.num_hidden_layers)],
    )


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's expected chatter: kv inputs share their batch/past Dims ("axis name ... will not be
    used"), weights are detached during optimize ("Skipped deduplication ..."), torchvision ops are absent."""
    loggers = [logging.getLogger(name) for name in
               ("onnx_ir.passes.common.initializer_deduplication", "torch.onnx._internal.exporter._registration")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def trace(config: GPTNeoXConfig, dtype: torch.dtype, opset: int) -> tuple[ir.Model, dict[str, torch.Tensor]]:
    """Export a weightless graph; returns it with its meta weights by initializer name (their values unset)."""
    wrapper = FlatCacheLM(meta_model(config, dtype)).eval()
    inputs, outputs = io_names(config.num_hidden_layers)
    with quiet_exporter():
        program = torch.onnx.export(
            wrapper,
            trace_inputs(config, dtype),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(config.num_hidden_layers),
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            # The optimizer's constant folding reads weight values, which meta tensors lack: optimize below.
            optimize=False,
            verbose=False,
        )
        weights = detach_weights(program.model.graph)
        program.optimize()
    return program.model, weights


def detach_weights(graph: ir.Graph) -> dict[str, torch.Tensor]:
    """Unset every meta initializer, so the optimizer treats weights as opaque (no folding, no dedup)."""
    weights = {}
    for name, value in graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.device.type == "meta":
            weights[name] = raw
            value.const_value = None
    return weights


def rotary_buffers(config: GPTNeoXConfig) -> dict[str, torch.Tensor]:
    """The non-persistent rotary buffer: traced as a weight, but never stored in checkpoints."""
    return {"gpt_neox.rotary_emb.inv_freq": GPTNeoXRotaryEmbedding(config).inv_freq}


def lazy_tensor(name: str, like: torch.Tensor, read: WeightReader, transpose: bool) -> ir.LazyTensor:
    """A weight that is read, cast (and transposed) only when the saver asks for its bytes."""
    key = name.removeprefix(WRAPPER_PREFIX)

    def load() -> ir.Tensor:
        tensor = read(key).to("cpu", like.dtype)
        return ir.tensor((tensor.T if transpose else tensor).contiguous().numpy())

    shape = list(reversed(like.shape)) if transpose else list(like.shape)
    dtype = ir.DataType.from_numpy(torch.empty(0, dtype=like.dtype).numpy().dtype)
    return ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name + (".T" if transpose else ""))


def attach_weights(graph: ir.Graph, weights: dict[str, torch.Tensor], read: WeightReader) -> None:
    """Give every detached initializer a lazy value from `read`.

    The exporter lowers nn.Linear to MatMul(x, Transpose(W)); the optimizer could not fold that without the
    values, so fold it here: the initializer becomes "<name>.T", transposed as it is saved.
    """
    for node in list(graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if (weight is None or weight.name not in weights or len(weight.uses()) != 1
                or list(node.attributes.get_ints("perm", [])) != [1, 0]):
            continue
        lazy = lazy_tensor(weight.name, weights[weight.name], read, transpose=True)
        folded = ir.Value(name=lazy.name, const_value=lazy)
        folded.shape, folded.dtype = folded.const_value.shape, folded.const_value.dtype
        graph.register_initializer(folded)
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)
    for name, value in graph.initializers.items():
        if value.const_value is None:
            value.const_value = lazy_tensor(name, weights[name], read, transpose=False)


def save_graph(model: ir.Model, folder: Path) -> Path:
    """Write model.onnx and its one external-data sidecar, one tensor in memory at a time (relative location,
    so the folder loads from anywhere)."""
    path = Path(folder) / MODEL_FILE
    ir.save(model, path, external_data=DATA_FILE)
    return path


def export_graph(config: GPTNeoXConfig, dtype: torch.dtype, opset: int, read: WeightReader, folder: Path) -> Path:
    """Trace, attach `read`'s weights lazily and save into `folder`; returns the model.onnx path."""
    model, weights = trace(config, dtype, opset)
    buffers = rotary_buffers(config)
    attach_weights(model.graph, weights, lambda key: buffers[key] if key in buffers else read(key))
    return save_graph(model, folder)
