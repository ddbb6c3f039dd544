"""`quantkit export --fmt onnx-int4`: a GPTQ 4-bit artifact -> an ONNX artifact whose quantized linears run as
ONNX Runtime's `com.microsoft.MatMulNBits`, from the same packed weights (one quantization, two runtimes).

The fp16 graph of onnx_graph is traced as usual; then each `MatMul(x, <module>.weight.T)` of a quantized module
becomes `MatMulNBits(x, B, scales, zero_points)` (the bias Add stays as it is). B, scales and zero points are
re-laid out from the GPTQ tensors exactly, so the dequantized weight is bit-for-bit the GPTQ one:
  GPTQ    qweight int32 [K/8, N] (nibbles low-first along K), qzeros int32 [groups, N/8] (v1: stored zero - 1),
          scales fp16 [groups, N], g_idx int32 [K];  W[k, n] = scales[g_idx[k], n] * (q[k, n] - (z[g_idx[k], n] + 1))
  ORT     B uint8 [N, blocks, block_size/2] (low nibble first along K), scales [N * blocks],
          zero_points uint8 [N * ceil(blocks/2)] or scales' dtype [N * blocks];  W = (q - zero_point) * scale per block
With act-order, g_idx is not sorted: the input features are permuted (a Gather on the activation's last axis, and
the rows of q in the same order) so that every group is contiguous; the product is unchanged.

Everything else (IO names, external data, config/tokenizer files, validation before publishing) is the fp16 ONNX
export's; validation runs against the checkpoint dequantized exactly into a plain PyTorch model (gptq_layout), with
the ONNX export's tolerance for the graph dtype: only its rounding separates the two (at accuracy_level 4, the
int8 activations: INT8_ACTIVATIONS).
"""
from __future__ import annotations

import gc
import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from safetensors import safe_open
from transformers import GPTNeoXConfig

from quantkit.errors import QuantkitError
from quantkit.export import onnx_graph
from quantkit.export.artifact import ensure_free_space, staged_output, versions, write_manifest
from quantkit.export.gptq import GptqOptions, export_gptq
from quantkit.export.gptq_layout import BITS, dequantized_model, quantized_prefixes, unpack_nibbles
from quantkit.export.onnx import (
    DTYPES,
    TOLERANCES,
    Reference,
    Tolerance,
    check_artifact,
    checkpoint_reader,
    record_reference,
    validation_section,
    write_sidecar_files,
)
from quantkit.paths import output_folder
from quantkit.sources import default_device, load_tokenizer, source_record

FORMAT = "onnx-int4"
# The graph dtype (activations, KV cache, scales, unquantized weights): fp16 as in GPTQ, for CUDA; fp32 for
# ONNX Runtime's CPU provider, which has no fp16 kernels for most ops and would cast around each of them.
IR_DTYPES = {torch.float16: ir.DataType.FLOAT16, torch.float32: ir.DataType.FLOAT}


# accuracy_level 4: MatMulNBits quantizes each block of its input to int8 on the fly (W4A8), ONNX Runtime's fastest
# CPU path (1.9x fp32 ONNX decode at 200M vs 1.2x at level 0). Measured against the dequantized checkpoint: max
# |diff| 0.109 at logit scale 14.1 on the trained tiny model (0.8 % of it) and 0.066 at 3.5 on random-weight
# stablelm-200m (1.9 %); perplexity +0.01 % on tiny. This bound is about twice those; a zero point off by one
# (~0.6 on tiny) still fails it.
INT8_ACTIVATIONS = Tolerance(atol=0.05, rtol=0.02)


@dataclass(frozen=True)
class Int4Options:
    dtype: str = "fp16"  # the graph dtype: fp16 (CUDA) or fp32 (CPU)
    accuracy_level: int = 0  # MatMulNBits' compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise QuantkitError(f"unsupported ONNX dtype '{self.dtype}' (expected one of {', '.join(DTYPES)})")
        if self.accuracy_level not in range(5):
            raise QuantkitError(f"accuracy level must be 0..4, got {self.accuracy_level}")

    @property
    def tolerance(self) -> Tolerance:
        """Level 4 computes with int8 activations; the others in the graph dtype, like the plain ONNX export."""
        return INT8_ACTIVATIONS if self.accuracy_level == 4 else TOLERANCES[self.dtype]
OPSET = 18
MS_DOMAIN = "com.microsoft"
DEFAULT_BLOCK = 128  # block size for per-column (group_size -1) checkpoints: one scale repeated over the blocks
LINEAR = re.compile(r"^model\.(gpt_neox\.layers\.\d+\.[a-z_.0-9]+)\.weight\.T$")  # onnx_graph's folded weights


# ---- GPTQ tensors -> MatMulNBits initializers -----------------------------------------------------------------


def pack_pairs(values: torch.Tensor) -> torch.Tensor:
    """uint8 values < 16, two per byte along the last axis (even index in the low nibble), zero-padded."""
    if values.shape[-1] % 2:
        values = torch.nn.functional.pad(values, (0, 1))
    return values[..., 0::2] | (values[..., 1::2] << 4)


@dataclass(frozen=True)
class QuantLinear:
    """One quantized linear: where its tensors are, its shape, and the input order that makes groups contiguous."""

    prefix: str  # checkpoint name, e.g. "gpt_neox.layers.0.attention.query_key_value"
    file: Path
    in_features: int  # K
    out_features: int  # N
    block_size: int
    order: torch.Tensor  # stable argsort of g_idx: ORT's input feature j is GPTQ's feature order[j]
    block_groups: torch.Tensor  # GPTQ group of each block
    dtype: torch.dtype  # of the scales and float zero points: the graph's

    @property
    def blocks(self) -> int:
        return -(-self.in_features // self.block_size)

    @property
    def reordered(self) -> bool:
        return not torch.equal(self.order, torch.arange(self.in_features))

    def read(self, field: str) -> torch.Tensor:
        with safe_open(self.file, "pt") as handle:
            return handle.get_tensor(f"{self.prefix}.{field}")

    def zeros(self) -> torch.Tensor:
        """Zero points per (N, block): v1 stores zero - 1, so add it back; a stored 0xF nibble gives 16."""
        z = unpack_nibbles(self.read("qzeros"), 1)[:, : self.out_features].long() + 1
        return z[self.block_groups].t()

    def packed_weight(self) -> np.ndarray:
        q = unpack_nibbles(self.read("qweight"), 0)[self.order]  # [K, N], rows in ORT's input order
        padded = torch.nn.functional.pad(q.t(), (0, self.blocks * self.block_size - self.in_features))
        return pack_pairs(padded).reshape(self.out_features, self.blocks, self.block_size // 2).numpy()

    def scales(self) -> np.ndarray:
        return self.read("scales")[self.block_groups].t().to(self.dtype).reshape(-1).numpy()

    def zero_points(self) -> np.ndarray:
        """Packed uint8 when every zero point fits in a nibble (ORT's fast kernels take those), else in the scales'
        dtype (exact for 1..16)."""
        z = self.zeros()
        if int(z.max()) < 16:
            return pack_pairs(z.to(torch.uint8)).reshape(-1).numpy()
        return z.to(self.dtype).reshape(-1).numpy()

    def zero_point_spec(self) -> tuple[ir.DataType, int]:
        z = self.zeros()
        if int(z.max()) < 16:
            return ir.DataType.UINT8, self.out_features * -(-self.blocks // 2)
        return IR_DTYPES[self.dtype], self.out_features * self.blocks


def block_size(group_size: int, in_features: int) -> int:
    """MatMulNBits blocks: the group size; per-column scales are repeated over blocks of DEFAULT_BLOCK."""
    return group_size if group_size > 0 else min(DEFAULT_BLOCK, 1 << (in_features - 1).bit_length())


def describe_linear(prefix: str, file: Path, group_size: int, dtype: torch.dtype) -> QuantLinear:
    with safe_open(file, "pt") as handle:
        g_idx = handle.get_tensor(f"{prefix}.g_idx").long()
        out_features = handle.get_slice(f"{prefix}.qweight").get_shape()[1]
    in_features = len(g_idx)
    size = block_size(group_size, in_features)
    order = torch.argsort(g_idx, stable=True)
    groups = g_idx[order]
    starts = torch.arange(0, in_features, size)
    ends = torch.clamp(starts + size, max=in_features) - 1
    if not torch.equal(groups[starts], groups[ends]):
        raise QuantkitError(f"{prefix}: its groups are not {size} features each, which MatMulNBits blocks need")
    return QuantLinear(prefix, file, in_features, out_features, size, order, groups[starts], dtype)


def quantized_linears(folder: Path, group_size: int, dtype: torch.dtype = torch.float16) -> dict[str, QuantLinear]:
    """Every quantized linear of a GPTQ folder (any shard), by checkpoint prefix."""
    return {prefix: describe_linear(prefix, file, group_size, dtype)
            for prefix, file in quantized_prefixes(folder).items()}


# ---- graph surgery -----------------------------------------------------------------------------------------------


def initializer(graph: ir.Graph, name: str, dtype: ir.DataType, shape: list[int], load) -> ir.Value:
    """A lazily computed initializer: built from the GPTQ tensors only when the saver writes it."""
    tensor = ir.LazyTensor(lambda: ir.tensor(load(), name=name), dtype=dtype, shape=ir.Shape(shape), name=name)
    value = ir.Value(name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(dtype))
    graph.register_initializer(value)
    return value


def matmul_nbits(graph: ir.Graph, matmul: ir.Node, linear: QuantLinear, accuracy_level: int) -> None:
    """Replace `matmul` (x @ W.T) by MatMulNBits on the GPTQ weights, after a Gather when act-order reorders."""
    name = onnx_graph.WRAPPER_PREFIX + linear.prefix
    x, weight = matmul.inputs
    new_nodes = []
    if linear.reordered:
        perm = initializer(graph, f"{name}.input_order", ir.DataType.INT64, [linear.in_features],
                           lambda: linear.order.numpy())
        gather = ir.node("Gather", [x, perm], attributes={"axis": -1}, name=f"{name}/Gather",
                         outputs=[ir.Value(name=f"{name}/Gather_output_0")])
        x = gather.outputs[0]
        new_nodes.append(gather)
    n, blocks = linear.out_features, linear.blocks
    zp_dtype, zp_len = linear.zero_point_spec()
    inputs = [
        x,
        initializer(graph, f"{name}.B", ir.DataType.UINT8, [n, blocks, linear.block_size // 2], linear.packed_weight),
        initializer(graph, f"{name}.scales", IR_DTYPES[linear.dtype], [n * blocks], linear.scales),
        initializer(graph, f"{name}.zero_points", zp_dtype, [zp_len], linear.zero_points),
    ]
    node = ir.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=f"{name}/MatMulNBits",
                   attributes={"K": linear.in_features, "N": n, "bits": BITS, "block_size": linear.block_size,
                               "accuracy_level": accuracy_level},
                   outputs=[ir.Value(name=f"{name}/MatMulNBits_output_0")])
    new_nodes.append(node)
    node.outputs[0].shape, node.outputs[0].type = matmul.outputs[0].shape, matmul.outputs[0].type
    graph.insert_before(matmul, new_nodes)
    matmul.outputs[0].replace_all_uses_with(node.outputs[0])
    graph.remove(matmul, safe=True)
    graph.initializers.pop(weight.name)


def replace_linears(graph: ir.Graph, linears: dict[str, QuantLinear], accuracy_level: int = 0) -> None:
    """Swap every quantized linear's MatMul; fails if one of the checkpoint's linears is not found in the graph."""
    done = set()
    for node in list(graph):
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        match = LINEAR.match(weight.name) if weight is not None and weight.name else None
        if match and match.group(1) in linears:
            matmul_nbits(graph, node, linears[match.group(1)], accuracy_level)
            done.add(match.group(1))
    missing = sorted(linears.keys() - done)
    if missing:
        raise QuantkitError(f"no MatMul found in the traced graph for quantized linears: {', '.join(missing)}")


# ---- artifact ----------------------------------------------------------------------------------------------------


def is_gptq_folder(model: str) -> bool:
    config = Path(model) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def check_quantization(quantization: dict, folder: Path) -> None:
    if quantization.get("bits") != BITS:
        raise QuantkitError(f"{folder}: MatMulNBits export needs {BITS}-bit GPTQ, got {quantization.get('bits')} bits")
    if quantization.get("checkpoint_format", quantization.get("format", "gptq")) != "gptq":
        raise QuantkitError(f"{folder}: expected a classic (v1) GPTQ checkpoint, got "
                            f"{quantization.get('checkpoint_format') or quantization.get('format')}")


def write_model_files(gptq: Path, folder: Path, options: Int4Options) -> dict:
    """model.onnx + model.onnx.data, config (keeping quantization_config), generation config, tokenizer files.
    Returns the quantization config."""
    config = GPTNeoXConfig.from_pretrained(gptq)
    quantization = json.loads((gptq / "config.json").read_text())["quantization_config"]
    check_quantization(quantization, gptq)
    dtype = DTYPES[options.dtype]
    linears = quantized_linears(gptq, quantization["group_size"], dtype)
    model, weights = onnx_graph.trace(config, dtype, OPSET)
    buffers = onnx_graph.rotary_buffers(config)
    read = checkpoint_reader(gptq)
    onnx_graph.attach_weights(model.graph, weights, lambda key: buffers[key] if key in buffers else read(key))
    replace_linears(model.graph, linears, options.accuracy_level)
    model.opset_imports[MS_DOMAIN] = 1
    onnx_graph.save_graph(model, folder)
    extra = {"dtype": str(dtype).removeprefix("torch."), "quantization_config": quantization}
    write_sidecar_files(config, load_tokenizer(gptq), folder, extra)
    return quantization


def reference_dtype(device: str) -> torch.dtype:
    """fp32 where memory is plentiful (CPU): the exact product; fp16 on CUDA, like the fp16 export's reference."""
    return torch.float16 if device.startswith("cuda") else torch.float32


def validate(folder: Path, gptq: Path, options: Int4Options, device: str, out: Path) -> dict:
    """The ONNX export's validation and tolerance for the graph dtype, against the dequantized checkpoint; raises
    QuantkitError on failure."""
    from quantkit.backends.onnxrt import OnnxBackend
    from quantkit.backends.pytorch import TorchBackend

    dtype = reference_dtype(device)
    model = dequantized_model(gptq, dtype, device)
    backend = TorchBackend(model, load_tokenizer(gptq), name=f"gptq-dequantized-{str(dtype).removeprefix('torch.')}")
    reference = Reference(f"{backend.name} ({backend.device})", record_reference(backend))
    del backend, model
    gc.collect()
    record = {"reference": reference.name}
    record |= check_artifact(OnnxBackend(folder, device=device), reference.runs, options.tolerance)
    if not record["passed"]:
        more = f" (+{len(record['problems']) - 1} more)" if len(record["problems"]) > 1 else ""
        raise QuantkitError(f"ONNX int4 validation failed: {record['problems'][0]}{more}; nothing was written to {out}")
    return record


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def export_from_gptq(gptq: Path, source: str, out: Path, options: Int4Options, overwrite: bool, device: str,
                     extra: dict) -> Path:
    started = time.perf_counter()
    with staged_output(out, overwrite) as staging:
        ensure_free_space(staging, folder_bytes(gptq) + 2**26)
        try:
            quantization = write_model_files(gptq, staging, options)
        except OSError as exc:
            raise QuantkitError(f"could not write the ONNX model into {out.parent}: {exc}") from None
        validation = validate(staging, gptq, options, device, out)
        metrics = {"seconds": round(time.perf_counter() - started, 1),
                   "data_bytes": (staging / onnx_graph.DATA_FILE).stat().st_size}
        (staging / "README.md").write_text(model_card(source, quantization, options, validation, metrics))
        write_manifest(staging, {"format": FORMAT, "source": source_record(source),
                                 "options": {**asdict(options), "opset": OPSET},
                                 "quantization_config": quantization, "versions": versions(),
                                 "validation": validation, "metrics": metrics, **extra})
    return out


def export_onnx_int4(model: str, out: Path, options: Int4Options = Int4Options(), *, overwrite: bool = False,
                     gptq_options: GptqOptions | None = None, manifest_extra: dict | None = None) -> Path:
    """Export the GPTQ artifact `model` (or quantize `model` with `gptq_options` first) as an int4 ONNX folder."""
    out = Path(out)
    quantize = gptq_options or GptqOptions()
    device = quantize.device or default_device()
    extra = dict(manifest_extra or {})
    if is_gptq_folder(model):
        return export_from_gptq(Path(model), model, out, options, overwrite, device, extra)
    if out.exists() and not overwrite:  # fail before the long quantization, not after it
        raise QuantkitError(f"output folder exists: {out} (pass --overwrite to replace it)")
    output_folder(out.parent)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gptq-", dir=out.parent) as work:
        gptq = export_gptq(model, Path(work) / "gptq", quantize)
        extra["gptq"] = {"options": asdict(quantize), "manifest": json.loads((gptq / "quantkit.json").read_text())}
        return export_from_gptq(gptq, model, out, options, overwrite, device, extra)


def model_card(source: str, quantization: dict, options: Int4Options, validation: dict, metrics: dict) -> str:
    group, dtype = quantization["group_size"], options.dtype
    return f"""# {Path(source).name} — ONNX int4 (GPTQ, MatMulNBits)

Exported by quantkit from the GPTQ checkpoint `{source}` ({quantization['bits']}-bit, group size {group},
{'act-order' if quantization.get('desc_act') else 'no act-order'}, {'symmetric' if quantization.get('sym') else 'asymmetric'}).
Every quantized linear is ONNX Runtime's `com.microsoft.MatMulNBits` on the GPTQ checkpoint's own packed weights,
scales and zero points (re-laid out, not re-quantized; with act-order a `Gather` permutes the input features so
groups are contiguous; accuracy_level {options.accuracy_level}). The embedding, the output head, LayerNorms and
biases are {dtype} ({'as in the checkpoint' if dtype == 'fp16' else 'from the fp16 checkpoint, for the CPU provider'}).
`config.json` keeps the `quantization_config` for the record. Data: {metrics['data_bytes'] / 2**20:.1f} MiB in
`model.onnx.data`.

Needs ONNX Runtime with the com.microsoft contrib ops (the standard `onnxruntime` / `onnxruntime-gpu` packages).
The inputs, outputs and KV cache are those of quantkit's ONNX export (optimum's names):
`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{{i}}.key|value` ({dtype}) in; `logits` (fp32) and
`present.{{i}}.key|value` out. Run it with `quantkit generate --model path/to/this/folder --prompt "Hi!"` or
optimum's `ORTModelForCausalLM`.

Prompt format: `<|SYSTEM|>{{system}}<|USER|>{{message}}<|ASSISTANT|>`; stop ids in generation_config.json.

## Validation
{validation_section(validation)}"""
