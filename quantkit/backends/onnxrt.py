"""ONNX Runtime backend for an exported artifact folder (model.onnx + model.onnx.data + config and tokenizer).

Inputs, outputs and the KV cache are torch tensors bound to ONNX Runtime by pointer (IO binding), so on CUDA the
cache never leaves the GPU; on CPU the same path runs with CPU tensors.

ONNX Runtime's CPU provider has no fp16 kernels for MatMul, LayerNorm, Softmax and most other ops: it inserts Casts
and keeps an fp32 copy of every MatMul weight, so an fp16 artifact needs about 2x its weight bytes in RAM there and
computes in fp32. It still runs and is tested on CPU; the fp16 artifact is meant for CUDA.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

from quantkit.errors import QuantkitError
from quantkit.export.onnx_graph import DATA_FILE, INPUT_NAMES, MODEL_FILE, io_names, past_names, present_names
from quantkit.sources import load_tokenizer

CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"
ORT_TYPES = {"tensor(float16)": torch.float16, "tensor(float)": torch.float32}
DTYPE_LABELS = {torch.float16: "fp16", torch.float32: "fp32"}


def cuda_usable() -> bool:
    return CUDA_PROVIDER in ort.get_available_providers() and torch.cuda.is_available()


def pick_device(device: str | None) -> str:
    """cuda when onnxruntime-gpu and a GPU are both present (or asked for and present), else cpu, with a warning
    when cuda was asked for but cannot be used."""
    if device is not None and not device.startswith(("cpu", "cuda")):
        raise QuantkitError(f"unknown device '{device}' for ONNX Runtime (expected cpu or cuda)")
    if device is None:
        return "cuda" if cuda_usable() else "cpu"
    if device.startswith("cuda") and not cuda_usable():
        warnings.warn(
            f"{device} was asked for, but ONNX Runtime's CUDAExecutionProvider or a GPU is missing "
            f"(available providers: {', '.join(ort.get_available_providers())}; install onnxruntime-gpu): running on CPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return "cpu"
    return device


def open_session(model_path: Path, device: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if device == "cpu":
        options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as the PyTorch backend
        # ORT's threads spin on after a run by default, on the cores where the runner's torch ops (sampling, the
        # mask) run between steps, and each side then waits for the other: stop the spin when a run returns.
        # Measured on the 2-core Xeon (runner decode tok/s at batch 1 / 8): 200m onnx-int4 49 / 174 -> 64 / 238,
        # 200m ONNX fp32 30 / 136 -> 35 / 165, tiny onnx-int4 at batch 8 1.4-1.7k -> 3.8k.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        providers: list = [CPU_PROVIDER]
    else:
        providers = [(CUDA_PROVIDER, {"device_id": torch.device(device).index or 0}), CPU_PROVIDER]
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for bad or missing files
        raise QuantkitError(f"ONNX Runtime could not load {model_path}: {str(exc).strip().splitlines()[0]}") from None


def check_io(session: ort.InferenceSession, layers: int, model_path: Path) -> None:
    """Refuse a graph that lacks an input or output the runner binds (e.g. one exported without position_ids)."""
    expected_inputs, expected_outputs = io_names(layers)
    for kind, expected, actual in (("inputs", expected_inputs, session.get_inputs()),
                                   ("outputs", expected_outputs, session.get_outputs())):
        missing = sorted(set(expected) - {value.name for value in actual})
        if missing:
            raise QuantkitError(f"{model_path} lacks the {kind} {', '.join(missing)} that quantkit's runner binds "
                                f"(expected the graph of `quantkit export --fmt onnx`)")


def numpy_type(dtype: torch.dtype) -> type:
    return torch.empty(0, dtype=dtype).numpy().dtype.type


class OnnxBackend:
    """Runs model.onnx with ONNX Runtime; the cache is the list of present tensors, in past-input order."""

    def __init__(self, folder: Path, device: str | None = None) -> None:
        folder = Path(folder).resolve()
        if not (folder / MODEL_FILE).is_file():
            raise QuantkitError(f"{folder} has no {MODEL_FILE}: not an ONNX artifact")
        config = json.loads((folder / "config.json").read_text())
        self.device = pick_device(device)
        self.session = open_session(folder / MODEL_FILE, self.device)
        self.tokenizer = load_tokenizer(folder)
        self.layers = config["num_hidden_layers"]
        check_io(self.session, self.layers, folder / MODEL_FILE)
        self.heads = config["num_attention_heads"]
        self.head_dim = config["hidden_size"] // self.heads
        self.vocab_rows = config["vocab_size"]
        self.max_positions = config["max_position_embeddings"]
        self.past_names, self.present_names = past_names(self.layers), present_names(self.layers)
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_dtype = ORT_TYPES[types[self.past_names[0]]]
        # onnx-int4 folders keep the GPTQ quantization_config for the record: their linears are MatMulNBits.
        quantized = config.get("quantization_config", {}).get("bits")
        self.name = f"onnx-int{quantized}" if quantized else f"onnx-{DTYPE_LABELS[self.kv_dtype]}"
        embedding_bytes = self.vocab_rows * config["hidden_size"] * self.kv_dtype.itemsize
        self.decode_weight_bytes = (folder / DATA_FILE).stat().st_size - embedding_bytes

    def new_cache(self, batch_size: int) -> list[torch.Tensor]:
        empty = torch.empty(batch_size, self.heads, 0, self.head_dim, dtype=self.kv_dtype, device=self.device)
        return [empty] * len(self.past_names)

    def bind(self, binding: ort.IOBinding, name: str, tensor: torch.Tensor, output: bool) -> None:
        """Hand ORT the tensor's memory; it must stay alive (and contiguous) until the run ends."""
        args = (name, tensor.device.type, tensor.device.index or 0, numpy_type(tensor.dtype), tuple(tensor.shape),
                tensor.data_ptr())
        (binding.bind_output if output else binding.bind_input)(*args)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: list[torch.Tensor],
        last_only: bool = True,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch, seq = input_ids.shape
        total = cache[0].shape[2] + seq
        inputs = dict(zip(INPUT_NAMES, (input_ids, attention_mask, position_ids)))
        inputs |= dict(zip(self.past_names, cache))
        inputs = {name: t.to(self.device).contiguous() for name, t in inputs.items()}
        logits = torch.empty(batch, seq, self.vocab_rows, dtype=torch.float32, device=self.device)
        present = [torch.empty(batch, self.heads, total, self.head_dim, dtype=self.kv_dtype, device=self.device)
                   for _ in self.present_names]
        binding = self.session.io_binding()
        for name, tensor in inputs.items():
            self.bind(binding, name, tensor, output=False)
        for name, tensor in zip(["logits", *self.present_names], [logits, *present]):
            self.bind(binding, name, tensor, output=True)
        if self.device != "cpu":
            # ORT runs on its own CUDA stream: make torch's writes to the inputs visible first. ORT synchronises
            # its stream at the end of the run, so the outputs are ready when it returns.
            torch.cuda.synchronize(self.device)
        self.session.run_with_iobinding(binding)
        return (logits[:, -1:] if last_only else logits), present
