"""Model sources: a built-in preset, a local Hugging Face folder or a hub id -> (GPTNeoXForCausalLM, tokenizer).

Presets:
  tiny, tiny-stablelm   the trained tiny StableLM (own tokenizer / the real StableLM tokenizer), see tiny.py
  stablelm-3b, -7b      the exact StableLM-Alpha shapes with seeded random weights (shape, memory, speed work)
  stablelm-200m         a ~200M-parameter StableLM-shaped model with random weights
A preset takes `:layers=N` to cut its depth, e.g. `stablelm-3b:layers=2`.
Weights load from safetensors only; remote code is never trusted.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerBase

from quantkit.attention import ATTN_IMPLEMENTATION
from quantkit.errors import QuantkitError
from quantkit.paths import data_dir
from quantkit.shapes import STABLELM_TOKENIZER, RandomShape
from quantkit.tiny import tiny_folder

SUPPORTED_MODEL_TYPE = "gpt_neox"


RANDOM_PRESETS = {
    "stablelm-3b": RandomShape(hidden=4096, layers=16, heads=32, vocab_rows=50688),
    "stablelm-7b": RandomShape(hidden=6144, layers=16, heads=48, vocab_rows=50432),
    "stablelm-200m": RandomShape(hidden=1024, layers=8, heads=16, vocab_rows=50688),
}
TINY_PRESETS = {"tiny": "own", "tiny-stablelm": "stablelm"}
PRESETS = (*TINY_PRESETS, *RANDOM_PRESETS)


@dataclass(frozen=True)
class Spec:
    """A parsed `--model` value."""

    preset: str | None
    layers: int | None
    folder: Path | None
    hub_id: str | None


def parse_spec(spec: str) -> Spec:
    """Tell a preset (with optional `:layers=N`), an existing folder and a hub id apart."""
    name, _, options = spec.partition(":")
    if name in PRESETS:
        layers = None
        if options:
            match = re.fullmatch(r"layers=(\d+)", options)
            if not match or int(match.group(1)) < 1:
                raise QuantkitError(f"bad preset option '{options}' in '{spec}' (expected layers=N, N >= 1)")
            layers = int(match.group(1))
        return Spec(name, layers, None, None)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        return Spec(None, None, path, None)
    return Spec(None, None, None, spec)


def model_folder(spec: str) -> Path | None:
    """The Hugging Face folder behind a spec (the tiny presets' cache folder included); None for random presets."""
    parsed = parse_spec(spec)
    if parsed.preset in TINY_PRESETS:
        return tiny_folder(TINY_PRESETS[parsed.preset]) / "model"
    if parsed.folder is not None:
        check_folder(parsed.folder)
        return parsed.folder
    return None


def load_model_config(spec: str) -> GPTNeoXConfig:
    """The config of a local spec (preset or folder), with `:layers=N` applied; no weights are read."""
    parsed = parse_spec(spec)
    if parsed.preset in RANDOM_PRESETS:
        return RANDOM_PRESETS[parsed.preset].config(parsed.layers)
    folder = model_folder(spec)
    if folder is None:
        raise QuantkitError(f"'{spec}' is not a local model: download it first or pass its folder")
    config = GPTNeoXConfig.from_pretrained(folder)
    if parsed.layers:
        config.num_hidden_layers = min(parsed.layers, config.num_hidden_layers)
    return config


def check_folder(folder: Path) -> dict:
    """Validate a local checkpoint folder and return its config; one clear error per problem."""
    if not folder.is_dir():
        raise QuantkitError(f"model folder not found: {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise QuantkitError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"{config_file} is not valid JSON: {exc}") from None
    model_type = config.get("model_type")
    if model_type != SUPPORTED_MODEL_TYPE:
        raise QuantkitError(
            f"unsupported architecture '{model_type}' in {config_file}: quantkit supports GPT-NeoX (StableLM-Alpha)"
        )
    if not any(folder.glob("*.safetensors")):
        raise QuantkitError(f"{folder} has no .safetensors weights (quantkit loads safetensors only)")
    return config


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types here; the user needs one line
        raise QuantkitError(f"could not load a tokenizer from {source}: {first_line(exc)}") from None


def random_preset_tokenizer() -> PreTrainedTokenizerBase:
    """The real StableLM tokenizer where shared data is present, else the tiny model's own."""
    shared = data_dir(required=False)
    if shared is not None and (shared / STABLELM_TOKENIZER).is_dir():
        return load_tokenizer(shared / STABLELM_TOKENIZER)
    return load_tokenizer(tiny_folder("own") / "model")


def build_random(shape: RandomShape, layers: int | None, dtype: torch.dtype, device: str) -> GPTNeoXForCausalLM:
    """Seeded random weights, created directly in `dtype` on `device` (a 7B never exists in fp32)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM._from_config(
            shape.config(layers), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
    return model.eval()


def load_pretrained(source: str | Path, dtype: torch.dtype, device: str) -> GPTNeoXForCausalLM:
    try:
        model = GPTNeoXForCausalLM.from_pretrained(
            str(source),
            dtype=dtype,
            device_map=device,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation=ATTN_IMPLEMENTATION,
        )
    except Exception as exc:  # corrupt or truncated safetensors, missing tensors, hub failures
        raise QuantkitError(f"could not load weights from {source}: {first_line(exc)}") from None
    return model.eval()


def load_model(
    spec: str, dtype: torch.dtype | None = None, device: str | None = None
) -> tuple[GPTNeoXForCausalLM, PreTrainedTokenizerBase]:
    """Model and tokenizer for a `--model` value; fp16 on CUDA, fp32 on CPU unless `dtype` says otherwise."""
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    parsed = parse_spec(spec)
    if parsed.preset in RANDOM_PRESETS:
        model = build_random(RANDOM_PRESETS[parsed.preset], parsed.layers, dtype, device)
        return model, random_preset_tokenizer()
    if parsed.hub_id is not None:
        check_hub_architecture(parsed.hub_id)
        return load_pretrained(parsed.hub_id, dtype, device), load_tokenizer(parsed.hub_id)
    folder = model_folder(spec)
    model = load_pretrained(folder, dtype, device)
    if parsed.layers:
        cut_layers(model, parsed.layers)
    return model, load_tokenizer(folder)


def cut_layers(model: GPTNeoXForCausalLM, layers: int) -> None:
    """Keep the first `layers` transformer blocks (for quick runs at real width)."""
    model.gpt_neox.layers = model.gpt_neox.layers[:layers]
    model.config.num_hidden_layers = len(model.gpt_neox.layers)


def check_hub_architecture(hub_id: str) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(hub_id, trust_remote_code=False)
    except Exception as exc:
        raise QuantkitError(f"could not fetch '{hub_id}' from the Hugging Face hub: {first_line(exc)}") from None
    if config.model_type != SUPPORTED_MODEL_TYPE:
        raise QuantkitError(f"unsupported architecture '{config.model_type}' for {hub_id}: quantkit supports GPT-NeoX")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
